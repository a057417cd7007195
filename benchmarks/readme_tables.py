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
        f"{d['compile']} (`python benchmarks/e2e_wan.py`, {path.name}):",
        "",
        "| size | batch | setting | density | default compile ms | fgattn ms | speedup | limit speedup | peak memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d["rows"]:
        lim = f"{r['limit_speedup']:.2f}x" if r.get("limit_speedup") else "-"
        mem = f"{r['memory_ratio']:.3f}" if r.get("memory_ratio") else "-"
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['setting']} | {r['density']:.3f} | {r['ms_default']:.1f} | "
            f"{r['ms_fgattn']:.1f} | {r['speedup']:.2f}x | {lim} | {mem} |"
        )
    return "\n".join(lines)


def main() -> None:
    parts = []
    for p in sorted(RESULTS.glob("kernel_*.json")):
        parts.append(kernel_table(p))
    for p in sorted(RESULTS.glob("e2e_wan_*.json")):
        if "cpu" not in p.name:
            parts.append(e2e_table(p))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
