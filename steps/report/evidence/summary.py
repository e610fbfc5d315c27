"""`summary.md`: what `make gpu-evidence` found, on one page, against the numbers issue 26 set:
LoRA at the 1.1B shape at MFU >= 40% and >= 1.8x HF Trainer + PEFT; QLoRA at 7B at <= 0.5x
LoRA's peak and >= 0.75x its tokens/s; the plan within 15% (tokens/s) and 10% (memory) of every
GPU cell of the flow."""

from __future__ import annotations

import json
from pathlib import Path

# (what the page calls it, the value's name, the bound, whether the value must reach it or stay under it)
TARGETS = (
    ("LoRA 1.1B MFU >= 40%", "mfu", 0.40, True),
    ("LoRA 1.1B kernels >= 1.8x HF Trainer + PEFT (same micro-batch)", "kernels_vs_hf", 1.8, True),
    ("QLoRA 7B peak <= 0.5x LoRA's", "qlora_peak_vs_lora", 0.5, False),
    ("QLoRA 7B tokens/s >= 0.75x LoRA's", "qlora_tokens_vs_lora", 0.75, True),
    ("plan tokens/s within 15% of every flow cell", "plan_tokens_per_s", 0.15, False),
    ("plan memory within 10% of every flow cell", "plan_mem_gb", 0.10, False),
)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _f(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "not met")


def _bench_rows(record: dict) -> list[str]:
    rows = ["| run | outcome | micro-batch | tokens/s | MFU | peak GB | estimate error | lora_kernels |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for part in record.get("parts", {}).values():
        for r in part.get("runs", []):
            est = r.get("estimate") or {}
            kernels = r.get("lora_kernels")
            routed = f"{kernels['mlp']} MLPs, {kernels['linear']} projections" if kernels else "-"
            rows.append(f"| {r.get('label')} | {r.get('outcome')} | {r.get('micro_batch', '-')} | "
                        f"{_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('mfu'), '.1%')} | "
                        f"{_f(r.get('peak_mem_gb'), '.1f')} | {_f(est.get('error'), '+.1%')} | "
                        f"{routed} |")
    return rows


def build(out: Path, statuses: list[dict], device: str | None, dry: bool = False) -> str:
    """The page, and summary.json beside it (the same numbers)."""
    tests = _read(out / "tests.json")
    lora = _read(out / "lora-1.1b.json").get("parts", {}).get("lora-1.1b", {})
    qlora = _read(out / "qlora-vs-lora-7b.json").get("parts", {}).get("qlora-7b", {})
    flow = _read(out / "flow.json")
    best_mfu = max((r.get("mfu") or 0 for r in lora.get("runs", []) if r.get("outcome") == "ok"), default=None)
    errors = {e["quantity"]: e.get("max_abs_error") for e in flow.get("errors", [])}
    values = {**lora.get("ratios", {}), **qlora.get("ratios", {}), "mfu": best_mfu or None,
              "plan_tokens_per_s": errors.get("tokens_per_s"), "plan_mem_gb": errors.get("mem_gb")}
    checks = {label: (v := values.get(key), None if v is None else v >= bound if at_least else v <= bound)
              for label, key, bound, at_least in TARGETS}
    lines = [f"# GPU evidence{' (dry run: nothing ran)' if dry else ''}", "",
             f"Device: {device or 'no GPU'}. Parts (each under its own time limit):", "",
             "| part | outcome | seconds | limit s |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['part']} | {s['outcome']} | {s.get('seconds', '-')} | {s.get('limit_s', '-')} |" for s in statuses]
    lines += ["", "## Against the targets", "", "| target | value | verdict |", "| --- | --- | --- |"]
    lines += [f"| {name} | {_f(value, '.3f')} | {_verdict(ok)} |" for name, (value, ok) in checks.items()]
    if tests:
        lines += ["", "## GPU tests", "",
                  f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('error', 0)} errors, "
                  f"{tests.get('skipped', 0)} skipped."]
        lines += [f"- {t['name']}: {t['outcome']}: {t['message'][:200]}" for t in tests.get("tests", [])
                  if t["outcome"] in ("failed", "error")]
    for title, part in (("LoRA, TinyLlama-1.1B shape, seq 2048, bf16-mixed", lora),
                        ("QLoRA vs LoRA, Llama-2-7B shape", qlora)):
        if part.get("runs"):
            lines += ["", f"## {title}", "", *_bench_rows({"parts": {"x": part}}), "",
                      "Ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in part.get("ratios", {}).items()
                                             if isinstance(v, (int, float)))]
    if flow.get("cells"):
        lines += ["", "## The flow on the GPU (planned vs measured)", "",
                  "| cell | outcome | tokens/s | peak GB |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['cell_id']} | {c['outcome']} | {_f(c.get('tokens_per_s'), ',.0f')} | "
                  f"{_f(c.get('peak_mem_gb'), '.2f')} |" for c in flow["cells"]]
        lines += ["", "| quantity | cells | median error | largest error | inside interval |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {e['quantity']} | {e['cells']} | {_f(e.get('median_abs_error'), '.1%')} | "
                  f"{_f(e.get('max_abs_error'), '.1%')} | {_f(e.get('inside'), '.0%')} |"
                  for e in flow.get("errors", [])]
    page = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(page)
    (out / "summary.json").write_text(json.dumps(
        {"device": device, "dry_run": dry, "parts": statuses,
         "targets": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()}}, indent=2, default=str))
    return page
