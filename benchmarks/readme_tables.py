"""Print the README's results tables (markdown) from the committed JSON in benchmarks/results/.

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def kernel_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = [
        f"Kernel, {d['device']}, torch {d['torch']}, triton {d['triton']}; B=1, H=12, D=128, bf16, M x 1 slices "
        f"(`python benchmarks/kernel_bench.py`, {path.name}):",
        "",
        "| S | mask | density | fgattn ms | cuDNN ms | speedup vs cuDNN | FlexAttention equal density ms | Flex covering ms | vs Flex covering |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d["rows"]:
        def f(k, fmt="{:.2f}"):
            v = r.get(k)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        lines.append(
            f"| {r['S']} | {r.get('mask', r.get('kind'))} | {r['density']:.3f} | {f('ours_ms')} | {f('cudnn_ms')} | "
            f"{f('speedup_vs_cudnn')}x | {f('flex_equal_ms')} | {f('flex_covering_ms')} | {f('speedup_vs_flex_covering')}x |"
        )
    lines += ["", "Summary: " + ", ".join(f"`{k}` {v}" for k, v in d["summary"].items())]
    return "\n".join(lines)


def e2e_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = [
        f"End to end, {d['config']} transformer forward, {d['device']}, torch {d['torch']}, triton {d['triton']}, "
        f"{d['compile']}, sparse kernel: {d.get('sparse_kernel', 'triton')} (`python benchmarks/e2e_wan.py`, {path.name}):",
        "",
        "| size | batch | setting | density | default compile ms | fgattn ms | speedup | limit speedup | model memory ratio | mask storage | masks on GPU, GB | lists in host memory, GB | process memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d["rows"]:
        lim = f"{r['limit_speedup']:.2f}x" if r.get("limit_speedup") else "-"
        mem = f"{r['memory_ratio']:.3f}" if r.get("memory_ratio") else "-"
        proc = f"{r['process_memory_ratio']:.3f}" if r.get("process_memory_ratio") else "-"
        masks = f"{r['mask_bytes'] / 1e9:.2f}" if r.get("mask_bytes") is not None else "-"
        note = " (kernel inside site_plan)" if r.get("direct_calls_timed") else ""
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['setting']}{note} | {r['density']:.3f} | {r['ms_default']:.1f} | "
            f"{r['ms_fgattn']:.1f} | {r['speedup']:.2f}x | {lim} | {mem} | {r.get('mask_storage', 'device')} | {masks} | "
            f"{r.get('host_list_bytes', 0) / 1e9:.2f} | {proc} |"
        )
    if "memory_definition" in d.get("summary", {}):
        lines += ["", "Model memory: " + d["summary"]["memory_definition"] + "."]
    return "\n".join(lines)


def _head(caption: str, columns: list) -> list:
    """A table's first lines: its caption, a blank line, the header row and the rule."""
    return [caption, "", "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]


def original_wan_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = _head(f"The original Wan2.1 code, {d['device']}, torch {d['torch']}, triton {d['triton']} "
                  f"(`python benchmarks/original_wan.py`, {path.name}):",
                  ["setting", "default ms", "fgattn ms", "speedup", "sparse sites"])
    for r in d["rows"]:
        lines.append(f"| {r['setting']} | {r['default_ms']:.1f} | {r['fgattn_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['sparse_sites']} of {r['sites']} |")
    return "\n".join(lines)


def e2e_models_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = _head(f"End to end, diffusers HunyuanVideo and CogVideoX-5B transformer forwards, {d['device']}, "
                  f"torch {d['torch']}, triton {d['triton']}, blocks compiled in place, sparse kernel: "
                  f"{d['sparse_kernel']} (`python benchmarks/e2e_models.py`, {path.name}):",
                  ["model", "tokens (video + text)", "setting", "density", "default ms", "default attention ms",
                   "fgattn ms", "fgattn attention ms", "speedup", "sparse sites"])
    for name, m in d["models"].items():
        valid = m["text_valid"] if isinstance(m["text_valid"], list) else [m["text_valid"]]
        pads = [m["text_tokens"] - n for n in valid]
        tokens = f"{m['video_tokens']} + {m['text_tokens']}" + (
            f" ({' / '.join(map(str, pads))} padded)" if any(pads) else "")
        for r in m["rows"]:
            dens = f"{r['mean_density']:.3f}" if r.get("mean_density") is not None else "-"
            lines.append(f"| {name} | {tokens} | {r['setting']} | {dens} | {m['default_ms']:.1f} | "
                         f"{m['default_attention_ms']:.1f} | {r['fgattn_ms']:.1f} | {r['attention_ms']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['sparse_sites']} of {r['sites']} |")
    return "\n".join(lines)


def masked_dense_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = _head(f"Dense attention with a key-padding mask, {d['device']}, torch {d['torch']}, triton {d['triton']}, "
                  f"every real key kept (`python benchmarks/masked_dense_probe.py`, {path.name}):",
                  ["shape (B, H, S, D; padded keys)", "SDPA masked ms", "SDPA unmasked (cuDNN) ms", "Gluon ms",
                   "Triton ms", "packing ms"])
    for r in d["rows"]:
        f = lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {r['case']}: {r['B']}, {r['H']}, {r['S']}, {r['D']}; {' and '.join(map(str, r['padded']))} | "
                     f"{f(r['sdpa_masked_ms'])} | {f(r['sdpa_unmasked_cudnn_ms'])} | {f(r.get('gluon_ms'))} | "
                     f"{f(r.get('triton_ms'))} | {r['pack_ms']:.3f} |")
    return "\n".join(lines)


def quality_video_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = [
        f"Quality on the trained toy video DiT ({d['tokens']} tokens, {d['steps']} steps, {len(d['seeds'])} videos), "
        f"{d['device']} (`python benchmarks/quality_video.py --device cuda`, {path.name}): PSNR against the dense "
        "video of the same seed, per setting; the density where each granularity reaches 30 dB:",
        "",
        "| granularity | settings (alpha or tau) | density at 30 dB | how found | best PSNR at density <= 0.6 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for g, v in d["density_at_30db"].items():
        rows = [r for r in d["settings"] if r["granularity"] == g]
        vals = ", ".join(f"{r.get('alpha', r.get('tau')):g}" for r in rows)
        low = [r["psnr_mean"] for r in rows if r["density"] is not None and r["density"] <= 0.6]
        dens = f"{v['density']:.3f}" if v["density"] is not None else "-"
        best = f"{max(low):.1f} dB" if low else "-"
        lines.append(f"| {rows[0]['label'] if rows else g} | {vals} | {dens} | {v['bound']} | {best} |")
    s = d.get("slices_vs_tiles128", {})
    lines += ["", f"M x 1 slices vs 128 x 128 tiles at 30 dB: density saving {s.get('density_saving')}, target {s.get('target')}, met: {s.get('met')}."]
    return "\n".join(lines)


def lowering_table(path: Path) -> str:
    d = json.loads(path.read_text())
    cmd = "python benchmarks/lowering_bench.py" + (" --compile-only" if "--compile-only" in d.get("command", "") else "")
    earlier = " (an earlier run's)" if d.get("runtime_from") else ""
    mode = d.get("summary", {}).get("compile_mode", "")
    lines = [f"Lowering, {d['device']}, torch {d.get('torch')}, triton {d.get('triton')} (`{cmd}`, {path.name})"
             f"{'; compile mode: ' + mode if mode else ''}:", "",
             f"| case | compile s (default) | compile s (fgattn) | compile time ratio | lowered / direct kernel time{earlier} |",
             "| --- | --- | --- | --- | --- |"]
    for case in ("toy", "wan", "wan_model"):
        c, r = d.get(case, {}).get("compile"), d.get(case, {}).get("runtime")
        if not c:
            continue
        rt = f"{r['runtime_ratio_lowered_vs_direct']:.4f}" if r else "-"
        n = c.get("repeats", 1)
        lines.append(f"| {case}{f' (median of {n})' if n > 1 else ''} | {c['compile_s']['inductor']:.1f} | "
                     f"{c['compile_s']['fgattn']:.1f} | {c['compile_time_ratio']:.2f} | {rt} |")
    if d.get("note_added_after_run"):
        lines += ["", f"Note: {d['note_added_after_run']}"]
    return "\n".join(lines)


def main() -> None:
    parts = []
    for p in sorted(RESULTS.glob("kernel_*.json")):
        if "in_model" not in p.name:  # kernel_in_model.py's probe: no table
            parts.append(kernel_table(p))
    for p in sorted(RESULTS.glob("e2e_wan_*.json")):
        if "cpu" not in p.name:
            parts.append(e2e_table(p))
    for p in sorted(RESULTS.glob("e2e_models_*.json")):
        if "cpu" not in p.name:
            parts.append(e2e_models_table(p))
    for p in sorted(RESULTS.glob("masked_dense_*.json")):
        parts.append(masked_dense_table(p))
    for p in sorted(RESULTS.glob("original_wan_*.json")):
        parts.append(original_wan_table(p))
    for p in sorted(RESULTS.glob("lowering_*.json")):
        parts.append(lowering_table(p))
    for p in sorted(RESULTS.glob("quality_video*.json")):
        if "tiny" not in p.name:
            parts.append(quality_video_table(p))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
