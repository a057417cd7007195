"""The README's demo and the Wan example run as a new user runs them, and say what they should."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "FGCOMPILE_STRICT"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_toy_video_dit_demo():
    out = _run("examples/toy_video_dit.py", "--steps", "3", "--depth", "2", "--profile-every", "2")
    assert "== attention sites ==" in out
    assert len(re.findall(r"blocks\.\d\.attn\s+sdpa.*sparse", out)) == 2
    assert len(re.findall(r"blocks\.\d\.cross\s+sdpa.*dense", out)) == 2
    dens = [float(d) for d in re.findall(r"density=([0-9.]+)", out)]
    assert len(dens) == 2 and all(0 < d < 1 for d in dens)
    err = float(re.search(r"relative error of the sampled latents vs dense attention: ([0-9.e-]+)", out).group(1))
    assert 0 < err < 0.1


def test_wan_transformer_example():
    out = _run("examples/wan_transformer.py", "--calls", "2")
    assert "blocks.0.attn1" in out and "sparse" in out
    assert "call 0: sites 2 profiled" in out
    # random weights keep nearly every slice: the sites run dense after profiling, and say so
    assert re.search(r"call 1: sites 2 dense ", out), out
    out = _run("examples/wan_transformer.py", "--calls", "2", "--density", "0.5")
    assert re.search(r"call 1: sites 2 sparse ", out), out


def test_e2e_wan_benchmark_smoke(tmp_path):
    """The Wan end-to-end benchmark runs (tiny config, CPU) and writes its JSON summary."""
    import json

    out = tmp_path / "e2e.json"
    _run("benchmarks/e2e_wan.py", "--tiny", "--device", "cpu", "--reps", "1", "--skip-720p", "--out", str(out))
    d = json.loads(out.read_text())
    assert {r["setting"] for r in d["rows"]} == {"d0.6", "d0.3", "profile"}
    d03 = next(r for r in d["rows"] if (r["setting"], r["batch"]) == ("d0.3", 1))
    assert abs(d03["density"] - 0.3) < 0.05 and d["summary"]["speedup_480p_b2_d03"] is not None
    assert (tmp_path / "e2e.png").is_file()


def test_predictor_trajectory_smoke(tmp_path):
    """The trajectory diagnostic runs on the shipped weights (one step, one layer) and reports,
    per CFG half, a density in (0, 1] and an error that shrinks as the profile rule keeps more."""
    import json

    out = tmp_path / "traj.json"
    _run("benchmarks/predictor_trajectory.py", "--sample-steps", "2", "--at-steps", "0", "--layers", "1",
         "--alphas", "1", "8", "--taus", "0.9", "--out", str(out))
    d = json.loads(out.read_text())
    rows = d["rows"]
    assert [(r["predictor"], r["layer"], r["step"]) for r in rows] == [("profile", 1, 0)] * 2 + [("pooled", 1, 0)]
    assert all(len(r["density"]) == 2 and all(0 < x <= 1 for x in r["density"]) for r in rows)
    loose, tight = rows[0], rows[1]  # alpha 1 keeps more than alpha 8
    assert loose["density"][0] > tight["density"][0] and loose["rel_err"][0] < tight["rel_err"][0]


def test_e2e_models_benchmark_smoke(tmp_path):
    """The HunyuanVideo / CogVideoX end-to-end benchmark runs (tiny configs, CPU, batch 2 with
    prompts of 6 and 2 real tokens) and writes its JSON: every site sparse under the budget, and
    with max_density 0.8 the dense calls after the profiled one."""
    import json

    out = tmp_path / "models.json"
    _run("benchmarks/e2e_models.py", "--tiny", "--device", "cpu", "--reps", "1", "--batch", "2", "--text-valid", "6,2",
         "--settings", "d0.3,profile-md0.8", "--out", str(out))
    d = json.loads(out.read_text())
    assert set(d["models"]) == {"hunyuan", "cogvideox"}
    assert d["models"]["hunyuan"]["text_valid"] == [6, 2]
    for m in d["models"].values():
        budget, dense = m["rows"]
        assert budget["setting"] == "d0.3" and budget["sparse_sites"] == budget["sites"] > 0
        assert abs(budget["mean_density"] - 0.3) < 0.05
        # random weights keep nearly every slice: over max_density 0.8, the calls after the profiled one run dense
        assert dense["setting"] == "profile-md0.8" and dense["calls"]["dense"] > 0 and dense["sparse_sites"] == 0


def test_quality_and_equal_error_benchmarks_with_the_query_order(tmp_path):
    """quality.py --query-order pca measures the tiles five ways and judges against the best;
    equal_error_bench.py's 128x1-pca row searches on reordered queries, its 128x128-pca-qk row on
    reordered queries and keys, and savings are judged against the best tile layout (tiny grid, CPU)."""
    import json

    _run("benchmarks/quality.py", "--grid", "4", "8", "16", "--heads", "2", "--head-dim", "32", "--query-order", "pca",
         "--name", "t", "--out-dir", str(tmp_path))
    d = json.loads((tmp_path / "quality_cpu_t.json").read_text())
    assert d["shapes"]["query_order"] == "pca"
    tiles = {k: d["summary"][k]["density_at_1pct"] for k in ("profile 128x128", "profile-raster 128x128", "profile-qk 128x128",
                                                             "profile-qk-full 128x128", "profile-qkw 128x128")}
    claim = d["mx1_vs_128x128_at_1pct"]
    assert claim["128x128_density"] == min(tiles.values())
    assert claim["mx1_density"] == d["summary"]["profile 128x1"]["density_at_1pct"]
    out = tmp_path / "ee.json"
    _run("benchmarks/equal_error_bench.py", "--grid", "4", "8", "16", "--heads", "2", "--head-dim", "32", "--no-time",
         "--steps", "6", "--granularities", "128x1,128x1-pca,128x128,128x128-pca-qk,128x128-pca-qk-full,128x128-pca-qkw",
         "--out", str(out))
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert rows["128x1-pca"]["query_order"] == "pca" and rows["128x1"]["query_order"] == "none"
    assert rows["128x128-pca-qk"]["key_order"] == "pca" and rows["128x1-pca"]["key_order"] == "none"
    assert all(0 < r["density"] <= 1 and r["rel_err"] <= 0.01 for r in rows.values())
    assert rows["128x128-pca-qkw"]["key_order"] == "pca"
    best_tiles = min(rows[n]["density"] for n in ("128x128", "128x128-pca-qk", "128x128-pca-qk-full", "128x128-pca-qkw"))
    assert res["density_saving_vs_128x128"]["128x1"] == 1 - rows["128x1"]["density"] / best_tiles
