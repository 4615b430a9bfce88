import pytest
import torch
from conftest import make_dataset, tiny_overrides
from PIL import Image
from torch import nn

from reslab.cli import main
from reslab.errors import ReslabError
from reslab.models import (
    ORDERS,
    ResidualUnit,
    activation_bytes,
    build_model,
    check_strides,
    count_params,
    input_size,
    list_models,
    model_options,
    summary,
)

# full-size ImageNet-style and very deep nets get a smaller input; every model must run forward and backward
SLOW_MODELS = {"resnet1202", "preact-resnet1001", "wrn-28-10"}


@pytest.mark.parametrize("name", [n for n in list_models() if n not in SLOW_MODELS])
def test_every_model_builds_runs_and_backprops(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=7)
    size = 64 if name.startswith(("resnet1", "resnet5", "resnet3", "plain1", "plain3", "d2l")) else 28
    x = torch.randn(2, 1, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_every_model_is_covered():
    assert set(list_models()) - SLOW_MODELS and SLOW_MODELS <= set(list_models())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_MODELS))
def test_very_deep_models(name):
    model = build_model(name, in_channels=3, num_classes=10)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()


def test_activation_bytes_on_the_meta_device_are_a_real_forwards():
    """The memory check before a CPU run (host.check_memory) counts what autograd keeps, on the meta device when
    the images are large: the count must be a real forward's, and every model of the library must run there."""
    for name, size in (("resnet8", 28), ("preact-resnet110", 28), ("d2l-resnet18", 64), ("resnet50", 64)):
        torch.manual_seed(0)
        real = activation_bytes(build_model(name, 1, 10).train(), (1, size, size))
        with torch.device("meta"):
            assert activation_bytes(build_model(name, 1, 10).train(), (1, size, size)) == real, name
    with torch.device("meta"):  # twice the side, four times the pixels: four times the maps (not the head's)
        net = build_model("resnet8", 1, 10).train()
        small, large = activation_bytes(net, (1, 28, 28))[0], activation_bytes(net, (1, 56, 56))[0]
    assert 3.95 * small < large < 4 * small
    for name in list_models():
        with torch.device("meta"):
            kept, largest = activation_bytes(build_model(name, 3, 10).train(), (3, 32, 32))
        assert kept > largest > 0, name


def test_counting_activations_lets_the_model_go():
    """The memory check counts on a copy of the run's model, which must be freed after: the count's forward graph
    once held it in a cycle that Python's collector could not see (221 MB of RSS for resnet152, all run long)."""
    import gc
    import weakref

    model = build_model("resnet20", 1, 10).train()
    weight = weakref.ref(next(model.parameters()))
    assert activation_bytes(model, (1, 28, 28))[0] > 0
    del model
    gc.collect()
    assert weight() is None


@pytest.mark.parametrize(
    "name,channels,classes,expected",
    [
        ("d2l-resnet18", 1, 10, 11_178_378),
        ("resnet20", 3, 10, 269_722),
        ("resnet110", 3, 10, 1_727_962),
        ("resnet18", 3, 1000, 11_689_512),
        ("resnet34", 3, 1000, 21_797_672),
        ("resnet50", 3, 1000, 25_557_032),
        ("resnet101", 3, 1000, 44_549_160),
        ("resnet152", 3, 1000, 60_192_808),
        ("wrn-28-10", 3, 10, 36_479_194),
    ],
)
def test_exact_parameter_counts(name, channels, classes, expected):
    assert count_params(build_model(name, channels, classes)) == expected


@pytest.mark.parametrize(
    "name,low,high", [("preact-resnet164", 1.65e6, 1.75e6), ("preact-resnet1001", 10.1e6, 10.4e6)]
)
def test_preact_parameter_counts_match_the_paper(name, low, high):
    assert low <= count_params(build_model(name, 3, 10)) <= high


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_twin_has_the_same_layers_minus_shortcuts(depth):
    plain, res = build_model(f"plain{depth}", 3, 10), build_model(f"resnet{depth}", 3, 10)
    assert count_params(plain) == count_params(res)  # option A shortcuts have no parameters
    convs = lambda m: [tuple(c.weight.shape) for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert convs(plain) == convs(res)
    assert all(u.shortcut is None for u in plain.modules() if isinstance(u, ResidualUnit))
    assert all(u.shortcut is not None for u in res.modules() if isinstance(u, ResidualUnit))
    assert len([u for u in res.modules() if isinstance(u, ResidualUnit)]) * 2 + 2 == depth


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("depth", [20, 110])
def test_every_unit_order_builds(order, depth):
    model = build_model(f"resnet{depth}", 1, 10, order=order)
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_unit_orders_place_layers_as_in_the_2016_paper():
    def layer_types(order):
        unit = ResidualUnit(16, 16, order=order, shortcut="identity")
        return [type(m).__name__ for m in unit.residual], unit.post, unit.pre

    assert layer_types("original")[0] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    assert isinstance(layer_types("original")[1], nn.ReLU)
    branch, post, _ = layer_types("bn-after-add")
    assert branch == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"] and isinstance(post[0], nn.BatchNorm2d)
    branch, post, _ = layer_types("relu-before-add")
    assert branch[-1] == "ReLU" and post is None
    branch, post, _ = layer_types("relu-preact")
    assert branch == ["ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"] and post is None
    branch, post, pre = layer_types("full-preact")
    assert branch == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"] and post is None
    assert [type(m).__name__ for m in pre] == ["BatchNorm2d", "ReLU"]


def test_a_full_preact_downsampling_shortcut_sees_bn_relu_of_x_unless_told_to_see_x():
    """The 2016 paper's code feeds a shortcut that is not the identity BN-ReLU(x); preact_shortcut=False feeds it
    the stream x. An identity shortcut sees x either way; the option means nothing in the other orders."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for flag in (True, False):
        for out, stride, shortcut in ((16, 2, "zeropad"), (16, 2, "projection"), (8, 1, "identity")):
            unit = ResidualUnit(
                8, out, stride, order="full-preact", shortcut=shortcut, preact_shortcut=flag
            ).eval()
            with torch.no_grad():
                pre = unit.pre(x)
                seen = pre if flag and shortcut != "identity" else x
                assert torch.allclose(unit(x), unit.residual(pre) + unit.shortcut(seen)), (flag, shortcut)
    net = build_model("resnet20", 1, 10, order="full-preact", preact_shortcut=False)
    assert [u.preact_shortcut for u in net.modules() if isinstance(u, ResidualUnit)] == [False] * 9
    with pytest.raises(ReslabError, match="preact_shortcut=False needs order full-preact; in original"):
        build_model("resnet20", 1, 10, preact_shortcut=False)


def test_dropout_sits_between_the_convolutions_and_only_trains():
    """Wide ResNets' dropout (Zagoruyko & Komodakis 2016): on the input of each convolution of F but the first,
    in every unit order, without parameters of its own; active in training only."""
    for order in ORDERS:
        branch = [type(m).__name__ for m in ResidualUnit(8, 8, order=order, dropout=0.3).residual]
        assert branch.count("Dropout") == 1 and branch[branch.index("Dropout") + 1] == "Conv2d", order
    bottleneck = ResidualUnit(8, 2, kind="bottleneck", dropout=0.3).residual
    assert [type(m).__name__ for m in bottleneck].count("Dropout") == 2
    plain, dropped = build_model("wrn-16-4", 1, 10), build_model("wrn-16-4", 1, 10, dropout=0.3)
    assert count_params(plain) == count_params(dropped)
    assert sum(isinstance(m, nn.Dropout) for m in dropped.modules()) == 6  # one per unit
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    assert not torch.equal(dropped.train()(x), dropped(x))  # a new mask each step
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))
    resnet = build_model("resnet20", 1, 10, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in resnet.modules()) == 9
    for bad in (1.0, -0.1):
        with pytest.raises(ReslabError, match=f"dropout must be at least 0 and below 1, got {bad}"):
            build_model("wrn-16-4", 1, 10, dropout=bad)


def test_identity_shortcut_keeps_the_input_intact():
    # in-place ReLUs must not overwrite x, which the shortcut still needs
    for order in ORDERS:
        unit = ResidualUnit(8, 8, order=order, shortcut="identity").eval()
        x = torch.randn(2, 8, 6, 6)
        x_copy = x.clone()
        unit(x)
        assert torch.equal(x, x_copy), order


def test_a_unit_whose_residual_branch_is_zero_is_the_identity():
    unit = ResidualUnit(8, 8, order="relu-before-add", shortcut="identity").eval()
    unit.residual[-2].weight.data.zero_()  # BN before the final ReLU: zero output of F
    x = torch.randn(1, 8, 5, 5)
    assert torch.allclose(unit(x), x)


def residual_outputs(model: nn.Module) -> list[torch.Tensor]:
    """What each unit's F gives for one random batch."""
    outputs = []
    for unit in (m for m in model.modules() if isinstance(m, ResidualUnit)):
        unit.residual.register_forward_hook(lambda module, args, out: outputs.append(out))
    model.eval()(torch.randn(2, 1, 32, 32))
    return outputs


@pytest.mark.parametrize(
    "name, options",
    [("resnet20", {"order": order}) for order in ORDERS]
    + [("wrn-16-4", {}), ("resnet50", {"order": "full-preact"})],
)
def test_zero_init_residual_starts_every_residual_branch_at_zero(name, options):
    # whichever layer ends F: BN, a ReLU after BN, or a convolution (the pre-activation orders and BN after the
    # addition); three of the five orders once kept their random start silently
    zeroed = residual_outputs(build_model(name, 1, 10, zero_init_residual=True, **options))
    assert zeroed and all(not out.any() for out in zeroed)
    assert all(out.any() for out in residual_outputs(build_model(name, 1, 10, **options)))


@pytest.mark.parametrize("size", [8, 7])
def test_zeropad_shortcut_downsamples_and_pads_with_zeros(size):
    unit = ResidualUnit(16, 32, stride=2, shortcut="zeropad")
    x = torch.randn(2, 16, size, size)
    h = unit.shortcut(x)
    assert h.shape == (2, 32, 4, 4)  # odd sizes round up, as the paper's x[:, :, ::2, ::2] does
    assert torch.equal(h[:, :16], x[:, :, ::2, ::2]) and h[:, 16:].abs().sum() == 0


def test_zeropad_shortcut_cannot_narrow_and_says_so_when_built(capsys):
    """Option A pads channels and has none to drop: a stem wider than the first stage needs a projection. The
    builder says so, rather than the first forward failing on a shape mismatch."""
    with pytest.raises(ReslabError, match="zeropad shortcut cannot narrow 64 to 32 channels"):
        build_model("resnet8", 1, 10, width=32, first_stride=2, stem_width=64)
    net = build_model("resnet8", 1, 10, width=32, first_stride=2, stem_width=64, shortcut="projection")
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert main(["summary", "--config", "fast", "--set", "model.options.stem_width=64"]) == 2
    assert capsys.readouterr().err.strip().endswith("use shortcut projection or projection-nobn")


def test_zeropad_shortcut_passes_back_a_gradient_in_the_input_memory_format():
    # the slice x[:, :, ::2, ::2] passed back an NCHW gradient; summed with the residual branch's channels_last
    # one, it turned the ReLU's backward before the unit into a strided copy: 14 ms of fast.yaml's 120 ms step
    unit = ResidualUnit(16, 32, stride=2, shortcut="zeropad").to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    h = torch.relu(x)
    grads = []
    h.register_hook(grads.append)
    unit(h).square().sum().backward()
    assert grads[0].is_contiguous(memory_format=torch.channels_last) and not grads[0].is_contiguous()


def test_shortcut_scale_and_bottleneck():
    unit = ResidualUnit(64, 16, kind="bottleneck", shortcut="projection", shortcut_scale=0.5)
    assert unit.out_channels == 64 and unit(torch.randn(1, 64, 4, 4)).shape == (1, 64, 4, 4)


def test_summary_rows_match_the_notebook():
    rows = summary(build_model("d2l-resnet18"), (1, 1, 224, 224), print_table=False)
    assert [r.output_shape for r in rows] == [
        (1, 64, 56, 56),
        (1, 64, 56, 56),
        (1, 128, 28, 28),
        (1, 256, 14, 14),
        (1, 512, 7, 7),
        (1, 512, 1, 1),
        (1, 512),
        (1, 10),
    ]
    assert sum(r.params for r in rows) == 11_178_378
    # ResNet-18 at 224 px is about 1.8 GMACs for 3 channels; 1 channel saves a little in the stem
    assert 3.3e9 < sum(r.flops for r in rows) < 3.7e9


def test_summary_defaults_to_the_size_each_model_is_built_for(capsys):
    """`reslab summary MODEL` without --input: a CIFAR-style net at Fashion-MNIST's 28 px, where its FLOPs are
    the ones training pays, the notebook's at the seed recipe's 96, ImageNet-style at 224."""
    for name, side, last_map in (("resnet20", 28, 7), ("d2l-resnet18", 96, 3), ("resnet18", 224, 7)):
        assert main(["summary", name]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{name}, input 1,1,{side},{side}\n") and f", {last_map}, {last_map})" in out
    assert input_size("wrn-40-4") == 28 and input_size("plain110") == 28 and input_size("plain34") == 224


def test_an_unknown_option_gets_the_commands_own_usage(capsys):
    # it used to get reslab's "usage: reslab [-h] COMMAND ...", which names none of the command's options
    with pytest.raises(SystemExit) as stop:
        main(["summary", "resnet8", "--size", "64"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: reslab summary [-h]") and "--input INPUT" in err
    assert err.endswith("reslab summary: error: unrecognized arguments: --size 64\n")


def test_summary_of_a_recipe_builds_its_model_with_its_options(capsys, tmp_path):
    """`reslab summary --config fast`: the recipe's ResNet-8 at width 32 with its first stage at 14 px and a 16-channel
    stem (54 M training FLOPs an image: 3x the forward's 18.1 M), and `--set` changes it as it would change the run."""
    assert main(["summary", "--config", "fast"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resnet8, width=32, first_stride=2, stem_width=16, input 1,1,28,28\n")
    assert "(1, 128, 4, 4)" in out and out.rstrip().endswith("292,666       18.1")
    assert main(["summary", "--config", "seed"]) == 0  # the notebook's net at its resize, 96 px
    assert capsys.readouterr().out.startswith("d2l-resnet18, input 1,1,96,96\n")
    assert main(["summary", "--config", "fast", "--set", "model.options.width=64"]) == 0
    assert "1,156,538" in capsys.readouterr().out
    # another model in the recipe trains at the recipe's 28 px, not at the 224 it is built for (64x the FLOPs)
    assert main(["summary", "--config", "fast", "--set", "model.name=resnet18"]) == 0
    assert capsys.readouterr().out.startswith("resnet18, input 1,1,28,28\n")
    # a bare model takes its builder's options, at the size it is built for: the lesion study's ResNet-56s
    assert main(["summary", "resnet56", "--set", "model.options.order=full-preact"]) == 0
    out = capsys.readouterr().out  # the stem stops at its convolution (144 weights): the units normalise
    assert out.startswith("resnet56, order=full-preact, input 1,1,28,28\n") and "  144  " in out
    argv = [
        "summary",
        "resnet56",
        "--set",
        "model.options.order=full-preact",
        "model.options.shortcut=projection",
    ]
    assert main(argv) == 0 and "855,482" in capsys.readouterr().out  # 2 projections for the zero-padding
    # data whose classes the recipe does not list (a folder, or idx without data.classes) is read for its images
    # and classes, or takes the flags instead
    recipe = ["summary", "--config", "fast", "--set"]
    idx = [*recipe, "data.name=idx", f"data.root={make_dataset(tmp_path / 'd', 8, 8)}"]
    assert main(idx) == 0 and "(1, 10)" in capsys.readouterr().out  # the tiny data's labels: 0..9
    assert main([*idx, "data.resize=40", "--num-classes", "4"]) == 2
    assert "--num-classes 4: the recipe's data has 10 classes" in capsys.readouterr().err
    flags = [*recipe, "data.name=idx", "data.root=.", "--num-classes", "4"]
    assert main([*flags, "--input", "1,1,28,28"]) == 0 and "(1, 4)" in capsys.readouterr().out
    assert main(flags) == 2
    assert "(or give --input N,C,H,W and --num-classes N)" in capsys.readouterr().err
    listed = [*recipe, "data.name=idx", "data.classes=[a,b]", "--input", "1,1,28,28"]
    assert main(listed) == 0 and "(1, 2)" in capsys.readouterr().out
    folder = tmp_path / "pics"
    for i in range(4):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40)).save(folder / f"c{i % 2}" / f"{i}.png")
    assert main([*recipe, "data.name=folder", f"data.root={folder}", "data.split=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resnet8, width=32, first_stride=2, stem_width=16, input 1,3,40,40\n")
    assert "(1, 2)" in out
    for argv, message in (
        (["summary"], "name a MODEL or a recipe with --config"),
        (["summary", "resnet8", "--config", "fast"], "name a MODEL or a recipe with --config"),
        (["summary", "resnet8", "--set", "train.epochs=2"], "--set takes model options"),
        (["summary", "resnet8", "--set", "model.name=resnet20"], "other keys need --config"),
        (["summary", "resnet8", "--set", "model=resnet20"], "other keys need --config"),
        (["summary", "resnet8", "--set", "model.options=3"], "other keys need --config"),
        (["summary", "resnet20", "--set", "model.options.colour=1"], "resnet20 has no such option"),
        (["summary", "--config", "fast", "--set", "model.options.colour=1"], "resnet8 has no such option"),
        # the head would not be the recipe's: Fashion-MNIST has 10 classes, an idx recipe the ones it names
        (
            ["summary", "--config", "fast", "--num-classes", "3"],
            "--num-classes 3: the recipe's data has 10 classes",
        ),
        (
            [
                "summary",
                "--config",
                "fast",
                "--set",
                "data.name=idx",
                "data.classes=[a,b]",
                "--input",
                "1,1,28,28",
                "--num-classes",
                "3",
            ],
            "--num-classes 3: the recipe's data has 2 classes",
        ),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_bad_names_and_options_list_the_choices():
    with pytest.raises(ReslabError, match="choose one of: d2l-resnet18"):
        build_model("resnet19")
    with pytest.raises(ReslabError, match="colour: resnet20 has no such option; its options: kind, order"):
        build_model("resnet20", colour="red")
    with pytest.raises(ReslabError, match="width: must be an integer from 1 to 2147483647, got -3"):
        build_model("resnet20", width=-3)
    with pytest.raises(ReslabError, match="unknown block kind 'wide'"):
        build_model("resnet20", kind="wide")
    with pytest.raises(ReslabError, match="num_classes must be an integer > 0, got 0"):
        build_model("resnet20", num_classes=0)
    with pytest.raises(ReslabError, match="unit order"):
        build_model("resnet20", order="sideways")
    with pytest.raises(ReslabError, match="6n\\+2"):
        from reslab.models import cifar_resnet

        cifar_resnet(21)
    assert "order" in model_options("resnet56") and "stem" in model_options("resnet18")
    with pytest.raises(ReslabError, match="ResidualUnit stride must be an integer > 0, got 0"):
        ResidualUnit(4, 4, stride=0)  # a unit built by hand: refused here, not at its first forward
    # options that would have no effect on the unit asked for are refused, not silently dropped
    with pytest.raises(ReslabError, match="shortcut_scale=0.5 needs a shortcut to scale; this unit has none"):
        build_model("plain20", shortcut_scale=0.5)
    with pytest.raises(
        ReslabError, match="always_project needs shortcut projection or projection-nobn, not zero"
    ):
        build_model("resnet20", always_project=True)
    assert build_model("resnet20", always_project=True, shortcut="projection-nobn")


def test_a_builders_own_check_from_a_config_names_its_keys_before_data_loads(tmp_path, capsys):
    """What check_options cannot see (a dropout's range, a shortcut to scale, an order for the shortcut option) the
    builders check; from a config that is one line under model.options, before the data is looked for."""
    from reslab import config

    for sets, message in (
        (["model.options.dropout=2"], "resnet8: dropout must be at least 0 and below 1, got 2"),
        (
            ["model.name=plain20", "model.options.shortcut_scale=0.5"],
            "plain20: shortcut_scale=0.5 needs a shortcut to scale; this unit has none",
        ),
        (
            ["model.options.preact_shortcut=false"],
            "resnet8: preact_shortcut=False needs order full-preact; in original the shortcut sees x",
        ),
    ):
        with pytest.raises(ReslabError) as caught:
            config.load("fast", sets)
        assert str(caught.value) == f"model.options of {message}"
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--set", f"data.root={tmp_path / 'none'}", "model.options.dropout=2"]
    assert main(argv) == 2
    err = "reslab: error: model.options of resnet8: dropout must be at least 0 and below 1, got 2\n"
    assert capsys.readouterr().err == err
    assert not run.exists()
    assert main(["summary", "resnet8", "--set", "model.options.dropout=2"]) == 2  # a bare model's options too
    assert capsys.readouterr().err == err


def test_stem_small_keeps_resolution():
    model = build_model("resnet18", 1, 10, stem="small")
    rows = summary(model, (1, 1, 28, 28), print_table=False)
    assert rows[0].output_shape == (1, 64, 28, 28)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "name, options, pooled",
    [("resnet20", {}, False), ("resnet18", {}, True), ("resnet50", {"stem": "small"}, False)],
)
def test_the_stem_leaves_to_pre_activation_units_what_they_normalise_themselves(name, options, pooled, order):
    # the ImageNet nets' standard stem once kept BN-ReLU in every order: a full pre-activation net normalised the
    # stem's output twice, BN-ReLU, max-pool, then the first unit's own BN-ReLU
    stem = build_model(name, 1, 10, order=order, **options).stem
    kinds = [type(m) for m in stem if not isinstance(m, nn.MaxPool2d)]
    expected = {"full-preact": [nn.Conv2d], "relu-preact": [nn.Conv2d, nn.BatchNorm2d]}
    assert kinds == expected.get(order, [nn.Conv2d, nn.BatchNorm2d, nn.ReLU])
    assert isinstance(stem[-1], nn.MaxPool2d) == pooled


def test_cifar_resolution_options_halve_the_maps_where_they_say():
    # first_stride=2 halves the maps in the first stage's first unit, stem_stride=2 already in the stem: the
    # stages then work at the same 14, 7 and 4 px, and only the stem's full-resolution maps are skipped
    stem = summary(build_model("resnet8", 1, 10, stem_stride=2), (1, 1, 28, 28), print_table=False)
    stage = summary(build_model("resnet8", 1, 10, first_stride=2), (1, 1, 28, 28), print_table=False)
    assert [r.output_shape for r in stem[:4]] == [
        (1, 16, 14, 14),
        (1, 16, 14, 14),
        (1, 32, 7, 7),
        (1, 64, 4, 4),
    ]
    assert [r.output_shape for r in stage[1:4]] == [r.output_shape for r in stem[1:4]]
    assert stage[0].output_shape == (1, 16, 28, 28)
    assert sum(r.params for r in stem) == sum(r.params for r in stage)


def test_stem_width_narrows_the_stem_alone():
    # fast.yaml's ResNet-8: only the stem's 28 px maps narrow; the first unit's zero-padding shortcut widens them
    rows = summary(
        build_model("resnet8", 1, 10, width=32, first_stride=2, stem_width=16), (1, 1, 28, 28), False
    )
    same = summary(build_model("resnet8", 1, 10, width=32, first_stride=2), (1, 1, 28, 28), print_table=False)
    assert [r.output_shape for r in rows[:4]] == [
        (1, 16, 28, 28),
        (1, 32, 14, 14),
        (1, 64, 7, 7),
        (1, 128, 4, 4),
    ]
    assert [r.output_shape for r in rows[1:]] == [r.output_shape for r in same[1:]]
    assert sum(r.params for r in same) - sum(r.params for r in rows) == 16 * 9 + 2 * 16 + 16 * 32 * 9
    assert build_model("resnet8", 1, 10, stem_width=None)[0][0].out_channels == 16  # None: the width
    with pytest.raises(ReslabError, match="stem_width: must be an integer from 1 to 2147483647, got 0"):
        build_model("resnet8", 1, 10, stem_width=0)


def test_models_command_counts_on_the_meta_device_as_a_real_build(capsys):
    from reslab.cli import main

    assert main(["models"]) == 0
    listed = dict(line.rsplit(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert list(listed) == list_models()
    for name in ("d2l-resnet18", "resnet20", "plain20", "preact-resnet164", "resnet50", "wrn-16-4"):
        assert int(listed[name].replace(",", "")) == count_params(build_model(name, 1, 10)), name
    assert listed["d2l-resnet18"] == "11,178,378"


def test_a_stride_above_the_images_side_is_one_line(tiny_data, tmp_path, capsys):
    """A stride above the images' side gives the 1x1 maps a stride of the side would, and PyTorch's backward
    pass slows with its square: a fast.yaml run with first_stride=4096 took 207 s, against 1.9 s at 64."""
    out = tmp_path / "run"
    extra = {"train.epochs": 1, "model.options.first_stride": 29}
    assert main(["train", "--out", str(out), "--quiet", "--set", *tiny_overrides(tiny_data, **extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "reslab: error: model 'resnet8' strides a convolution by 29, more than the 28-pixel images' side: a "
        "stride of 28 gives the same 1x1 maps, and a larger one only slows the backward pass; lower the stride "
        "options (model.options)"
    )
    assert not out.exists()
    check_strides(build_model("resnet8", first_stride=28, stem_stride=28), "resnet8", 28)
    with pytest.raises(ReslabError, match="strides a convolution by 29, more than the 28-pixel"):
        check_strides(build_model("resnet8", stem_stride=29), "resnet8", 28)
    # the library's own strides of 2 (the ImageNet stem's, fast.yaml's first stage's) on 1-pixel images
    check_strides(build_model("resnet18"), "resnet18", 1)
    check_strides(build_model("resnet8", first_stride=2), "resnet8", 1)
