"""Structured pruning and recovery on tiny models: real torch-pruning, real shapes, real errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from support import run_cli
from optimize.inputs.calibration import Samples
from optimize.inputs.checkpoint import load_checkpoint
from optimize.errors import CheckpointError, PruneError
from optimize.passes.distill import DistillConfig, distill
from optimize.passes.prune import PruneConfig, prune_module
from optimize.inputs.pruned_checkpoint import rebuild_pruned, save_pruned
from tiny_models import CustomLayerCNN, TinyCNN, tiny_cnn, tiny_encoder

X = (torch.randn(2, 3, 16, 16),)


def weights(module):
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def test_channel_pruning_shrinks_tensors_and_keeps_the_head():
    model = tiny_cnn(width=16)
    before = weights(model)
    outcome = prune_module(model, X, PruneConfig(0.5))
    after = weights(outcome.module)
    assert after["conv1.weight"] == (8, 3, 3, 3) and after["conv2.weight"] == (16, 8, 3, 3)
    assert after["head.weight"] == (5, 16)  # output width kept, inputs follow conv2
    assert weights(model) == before  # the original is untouched
    report = outcome.report
    assert report["kept_whole"] == ["head"] and report["granularity"] == "channels"
    assert report["macs_ratio"] >= 2 and report["params_after"] < report["params_before"]
    conv2 = next(layer for layer in report["layers"] if layer["name"] == "conv2")
    assert conv2["macs_after"] * 3 < conv2["macs_before"]
    assert outcome.module(*X).shape == (2, 5)
    # What recovery's advice names for --prune-ignore: conv2 lost 3/4 of its weights, conv1 1/2, the head
    # a little less (its bias keeps its width).
    from optimize.build.prune_stage import hardest_layers
    assert hardest_layers(model, report["layers"]) == ["conv2", "conv1", "head"]


def test_round_to_global_scope_and_importance_choices():
    model = tiny_cnn(width=16)
    rounded = weights(prune_module(model, X, PruneConfig(0.3, round_to=4)).module)
    assert rounded["conv1.weight"][0] % 4 == 0 and rounded["conv2.weight"][0] % 4 == 0
    for config in (PruneConfig(0.5, scope="global"), PruneConfig(0.5, importance="bn-scale")):
        assert prune_module(model, X, config).report["macs_after"] < prune_module(model, X, PruneConfig(0.1)).report["macs_before"]
    loss = lambda out: torch.nn.functional.cross_entropy(out, out.argmax(1).detach())  # noqa: E731
    taylor = prune_module(model, X, PruneConfig(0.5, importance="taylor"), [X], loss)
    assert weights(taylor.module)["conv1.weight"][0] == 8
    with pytest.raises(PruneError, match="taylor needs a loss"):
        prune_module(model, X, PruneConfig(0.5, importance="taylor"))


def test_bn_scale_without_batchnorm_and_bad_options_are_clear_errors():
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 2))
    with pytest.raises(PruneError, match="needs BatchNorm"):
        prune_module(plain, X, PruneConfig(0.5, importance="bn-scale"))
    with pytest.raises(PruneError, match="between 0 and 1"):
        prune_module(plain, X, PruneConfig(1.5))
    with pytest.raises(PruneError, match="did you mean conv2"):
        prune_module(tiny_cnn(), X, PruneConfig(0.5, ignore=("conv_2",)))


def test_custom_layer_with_raw_parameters_names_the_module_and_the_fix():
    torch.manual_seed(0)
    model = CustomLayerCNN().eval()
    with pytest.raises(PruneError) as caught:
        prune_module(model, X, PruneConfig(0.5))
    assert "'mix'" in str(caught.value) and "--prune-ignore mix" in str(caught.value)
    kept = prune_module(model, X, PruneConfig(0.5, ignore=("mix",)))
    after = weights(kept.module)
    assert after["mix.weight"] == (16, 16) and after["conv1.weight"][0] == 16  # channels into mix kept
    assert after["conv2.weight"][0] == 8  # the rest still pruned
    assert kept.report["custom_parameters"] == ["mix.weight"]


def test_attention_heads_are_removed_whole():
    model = tiny_encoder()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    outcome = prune_module(model, (ids, mask), PruneConfig(0.5))
    report = outcome.report
    assert report["granularity"] == "heads"
    for block, heads in report["heads"].items():
        assert heads["before"] == 4 and heads["after"] == 2 and len(heads["removed"]) == 2
    attention = outcome.module.encoder.encoder.layer[0].attention
    assert attention.self.query.weight.shape == (16, 32) and attention.output.dense.weight.shape == (32, 16)
    assert attention.self.num_attention_heads == 2
    assert outcome.module(ids, mask).shape == (2, 32)
    with pytest.raises(PruneError, match="attention models"):
        prune_module(model, (ids, mask), PruneConfig(0.5, granularity="channels"))


def test_pruned_checkpoint_rebuilds_from_the_original_class(tmp_path, tiny_checkpoint):
    model = tiny_cnn()
    outcome = prune_module(model, X, PruneConfig(0.5))
    save_pruned(model, outcome.module, tmp_path / "pruned.pt")
    saved = torch.load(tmp_path / "pruned.pt", weights_only=True)
    rebuilt = rebuild_pruned(TinyCNN(), saved["state_dict"], saved["pruned_architecture"])
    assert torch.equal(rebuilt(*X), outcome.module(*X))
    loaded = load_checkpoint(tmp_path / "pruned.pt", tiny_checkpoint["arch"])
    assert loaded.format == "pruned-state-dict" and torch.equal(loaded.module(*X), outcome.module(*X))
    with pytest.raises(CheckpointError, match="pruned checkpoint"):
        load_checkpoint(tmp_path / "pruned.pt", "tiny_models:tiny_encoder")


def _judge(model, x, budget):
    """A selection-split check of a student: agreement with ``model`` on ``x``."""
    from optimize import validate
    from optimize.passes.distill import teacher_distance
    from optimize.passes.recovery_curve import Check

    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()

    def judge(student):
        with torch.no_grad():
            got = student(torch.from_numpy(x)).numpy()
        result, verdict = validate.judge("classify", reference, got, None, budget)
        distance = teacher_distance("classify", got, reference)
        return Check(0, 0.0, verdict.drop, verdict.interval, verdict.passed, distance, result, 0.0, samples=len(x))
    return judge


def test_distillation_pulls_the_pruned_model_towards_the_original():
    model = tiny_cnn(width=16)
    pruned = prune_module(model, X, PruneConfig(0.5)).module
    rng = np.random.default_rng(0)
    data = Samples({"x": rng.standard_normal((256, 3, 16, 16)).astype(np.float32)})
    selection = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        teacher = {"output": model(torch.from_numpy(data.arrays["x"])).numpy()}
        before = float(torch.nn.functional.mse_loss(pruned(torch.from_numpy(data.arrays["x"])),
                                                    torch.from_numpy(teacher["output"])))
    summary = distill(pruned, data, teacher, ["x"], "classify", DistillConfig(steps=80), "cnn",
                      _judge(model, selection, 1.0), 1.0, progress=False)
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(pruned(torch.from_numpy(data.arrays["x"])),
                                                   torch.from_numpy(teacher["output"])))
    assert summary["loss_last"] < summary["loss_first"] and after < before
    assert not pruned.training and summary["samples"] == 256 and summary["steps"] <= 80
    curve = summary["curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == summary["steps"] and len(curve) >= 3
    # 64 selection samples: judged by the distance pooled with the training probe, and the closest is kept.
    assert all(c["signal"] == pytest.approx((64 * c["distance"] + 256 * c["train_distance"]) / 320) for c in curve)
    assert "steps of 1.6 points" in summary["signal"] and "pooled with 256 samples" in summary["signal"]
    best = min(curve, key=lambda c: c["signal"])
    assert summary["best"]["step"] == best["step"] == summary["best_step"]  # the closest check is what is kept
    assert abs(_judge(model, selection, 1.0)(pruned).distance - best["distance"]) < 1e-6


def test_distillation_stops_when_good_on_a_plateau_and_at_the_time_limit():
    model = tiny_cnn(width=16)
    rng = np.random.default_rng(1)
    data = Samples({"x": rng.standard_normal((64, 3, 16, 16)).astype(np.float32)})
    selection = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        teacher = {"output": model(torch.from_numpy(data.arrays["x"])).numpy()}

    def run(config, budget):
        pruned = prune_module(model, X, PruneConfig(0.5)).module
        return distill(pruned, data, teacher, ["x"], "classify", config, "cnn", _judge(model, selection, budget),
                       budget, progress=False)

    good = run(DistillConfig(), 99.0)  # any model is within a 99-point budget with a margin: no step taken
    assert good["steps"] == 0 and good["stopped"].startswith("met the budget") and good["advice"] is None
    # A zero budget is never met with a margin: it stops when flat at the third learning rate.
    flat = run(DistillConfig(check_every=25, patience=3, time_limit_s=60), 0.0)
    assert flat["stopped"].startswith("flattened: ") and flat["lr_cuts"] == 2, flat["stopped"]
    assert [c["lr"] for c in flat["curve"]][-1] == pytest.approx(1e-5)
    assert "more recovery data" in flat["advice"] and "--prune-ignore" in flat["advice"]  # 64 samples, many epochs
    timed = run(DistillConfig(time_limit_s=1.0, check_every=25), 0.0)
    assert timed["stopped"] == "reached --recover-time 1s" and timed["seconds"] < 5
    # What the advice says follows the curve's trend at the end (how far 1 s got depends on the machine).
    assert ("still improving" in timed["advice"]) == timed["trend"]["improving"], (timed["trend"], timed["advice"])


def test_the_distance_is_what_recovery_minimises_and_the_trend_decides():
    from optimize.passes.distill import teacher_distance
    from optimize.passes.recovery_curve import Check, advice, flattened, rate

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((100, 10))
    # A classifier's distance is blind to a shift of all of a sample's logits, as its loss is.
    assert teacher_distance("classify", logits + 5.0, logits) == pytest.approx(0.0, abs=1e-12)
    assert teacher_distance("classify", logits * 0.5, logits) > 0.01
    assert teacher_distance("regress", logits + 5.0, logits) > 1.0

    def checks(values, seconds_per_check=10.0):
        return [Check(i * 50, i * seconds_per_check, 2.0, (1.0, 3.0), False, v, {}, 1e-3, samples=1000, signal=v)
                for i, v in enumerate(values)]
    falling = checks([1.0 * 0.9 ** i for i in range(8)])
    noisy = checks([1.0, 0.7, 1.1, 0.8, 1.2, 0.75, 1.05, 0.9])
    flat = checks([0.5, 0.501, 0.499, 0.5, 0.5005, 0.4995])
    assert flattened(falling, 6, False) is None and flattened(noisy, 6, False) is None  # noise is not flat
    assert flattened(flat, 6, False).startswith("the distance to the original fell 0.")
    assert flattened(flat[:5], 6, False) is None  # too few checks to judge
    # Still improving when the time ran out: the advice gives the time it would likely need, from the
    # curve's own drop per unit of distance and its rate.
    summary = {"stopped": "reached --recover-time 1m", "seconds": 70.0, "samples": 900, "epochs": 20,
               "labelled_samples": 0, "curve": [c.to_json() for c in falling], "trend": rate(falling[1:])}
    for c, check in zip(summary["curve"], falling):
        c["drop"] = 2.0 * check.distance  # drop 2 points per unit of distance
    best = dataclasses.replace(falling[-1], drop=2.0 * falling[-1].distance)
    said = advice(summary, 0.5, best)
    assert "still falling 10.0% a check" in said and "--recover-time " in said, said
    # 0.9**7 = 0.478 to 0.2 (80% of the budget over 2): 8.3 checks of 10 s more, 153 s in all -> 3m
    assert said.endswith("--recover-time 3m"), said
    levelled = advice({**summary, "stopped": "flattened: ..."}, 0.5, best, ["conv2", "conv1"])
    assert "--prune-ignore conv2 --prune-ignore conv1 (the layers that lost most)" in levelled
    assert "more recovery data" in levelled  # 20 epochs over the data


def test_build_with_prune_records_each_step_and_reloads(tmp_path, tiny_checkpoint):
    t = tiny_checkpoint
    out = tmp_path / "bundle"
    result = run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--eval-data", t["eval"],
                     "--prune", "0.5", "--recover-steps", "40", "--target", "ort-fp32", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"]["prune"]
    recovery = stage["recovery"]
    assert stage["recovered"] and recovery["steps"] <= 40 and recovery["steps_cap"] == 40
    assert recovery["curve"][0]["step"] == 0 and recovery["stopped"]
    assert "recovery on the " in result.stderr and "step -> drop" in result.stderr
    # The curve keeps the held-out drop beside the selection's (for the report), and what it was judged by.
    assert all(c["held_out"]["drop"] is not None and c["train_distance"] >= 0 for c in recovery["curve"])
    assert "(held-out " in result.stderr and "recovery judged by its distance" in result.stderr
    assert recovery["gate"]["drop"] == pytest.approx(stage["accuracy"]["original"]["eval"]["accuracy_pct"]
                                                     - stage["accuracy"]["recovered"]["eval"]["accuracy_pct"])
    assert set(stage["accuracy"]) == {"original", "pruned", "recovered"}
    assert stage["macs_after"] < stage["macs_before"] / 2
    assert any("only 96 samples" in w for w in stage["warnings"]) and "warning: recovery saw only" in result.stderr
    assert manifest["stages"]["export"]["checked_against"] == "pruned PyTorch model"
    assert manifest["stages"]["export"]["parity"]["output"]["max_abs_error"] < 1e-4
    program = load_checkpoint(out / "program.pt2")
    assert program.module.conv1.weight.shape[0] == 4
    reloaded = load_checkpoint(out / "pruned.pt", t["arch"])
    held = np.load(out / "data" / "heldout.npz")["x"][:4]
    assert torch.allclose(program.module(torch.from_numpy(held)), reloaded.module(torch.from_numpy(held)), atol=1e-5)
    # The gate still measures against the original, unpruned model.
    reference = np.load(out / "data" / "reference.npz")["output"]
    with torch.no_grad():
        original = t["model"](torch.from_numpy(np.load(out / "data" / "heldout.npz")["x"])).numpy()
    assert np.allclose(reference, original, atol=1e-5)


def test_unrecovered_prune_is_reported_and_graphs_cannot_be_pruned(tmp_path, tiny_checkpoint):
    t = tiny_checkpoint
    out = tmp_path / "bundle"
    result = run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--prune", "0.5",
                     "--recover-steps", "0", "--max-accuracy-drop", "100", "--target", "ort-fp32", "--out", out)
    assert result.returncode == 0, result.stderr
    stage = json.loads((out / "manifest.json").read_text())["stages"]["prune"]
    assert not stage["recovered"] and "NOT recovered" in stage["warnings"][0]
    assert "NOT recovered" in result.stderr
    failed = run_cli("build", out / "program.pt2", "--calib", t["calib"], "--prune", "0.5",
                     "--target", "ort-fp32", "--out", tmp_path / "again")
    assert failed.returncode == 2 and "--prune needs an eager PyTorch model" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "again").exists()


def test_multihead_attention_is_kept_whole_and_the_mlps_pruned():
    from models.zoo import vit

    model = vit().eval()
    example = (torch.randn(2, 1, 8, 8),)
    outcome = prune_module(model, example, PruneConfig(0.5))
    report = outcome.report
    assert report["granularity"] == "channels" and report["macs_after"] < report["macs_before"]
    assert "nn.MultiheadAttention" in report["notes"][0]
    assert {"blocks.0.attn", "blocks.1.attn"} <= set(report["kept_whole"])
    assert outcome.module.blocks[0].mlp[0].out_features < model.blocks[0].mlp[0].out_features
    assert outcome.module.blocks[0].attn.embed_dim == model.blocks[0].attn.embed_dim
    with pytest.raises(PruneError, match=r"2 nn.MultiheadAttention module\(s\) \(blocks.0.attn, blocks.1.attn\)"):
        prune_module(model, example, PruneConfig(0.5, granularity="heads"))


def test_every_output_head_keeps_its_width():
    from models.zoo import two_in_two_out

    model = two_in_two_out().eval()
    example = (torch.randn(2, 10), torch.randn(2, 19))
    outcome = prune_module(model, example, PruneConfig(0.5))
    assert set(outcome.report["kept_whole"]) == {"classes", "value"}
    logits, value = outcome.module(*example)
    assert logits.shape == (2, 2) and value.shape == (2, 1) and outcome.report["macs_ratio"] > 2
