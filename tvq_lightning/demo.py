"""The main job on an embedded default: the store pipeline end to end on a generated model.

``tvq demo`` builds a tiny ViT-like encoder with CLIP-like heavy-tailed weights and synthetic
fine-tunes, then runs the real commands: ``tvq quantize`` with every scheme, ``tvq inspect``,
``tvq export``; it measures each store's bytes on disk and reconstruction error and prints the
storage table (also written to ``OUT/storage.md`` and ``OUT/storage.json``).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .cli.main import main as tvq
from .quant.schemes import relative_l2_error
from .store.checkpoints import load_state_dict
from .store.reader import TaskVectorStore
from .store.summary import summarize
from .testing import save_safetensors, synthetic_finetunes, tiny_pretrained

SCHEMES: list[tuple[str, list[str]]] = [
    ("fp32", ["--scheme", "fp32"]),
    ("fq8", ["--scheme", "fq", "--bits", "8"]),
    ("fq4", ["--scheme", "fq", "--bits", "4"]),
    ("tvq8", ["--scheme", "tvq", "--bits", "8"]),
    ("tvq4", ["--scheme", "tvq", "--bits", "4"]),
    ("tvq3", ["--scheme", "tvq", "--bits", "3"]),
    ("tvq2", ["--scheme", "tvq", "--bits", "2"]),
    ("rtvq_b3o2", ["--scheme", "rtvq", "--base-bits", "3", "--offset-bits", "2"]),
    ("budget", ["--scheme", "rtvq", "--budget", "2.5", "--per-tensor-bits"]),
]


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True)
    num_tasks = 4 if quick else 8
    width, depth = (64, 2) if quick else (192, 4)
    model = tiny_pretrained(seed, width=width, depth=depth)
    pre = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pre_path = save_safetensors(pre, out / "checkpoints" / "pretrained.safetensors")
    names = [f"task{i}" for i in range(num_tasks)]
    ft_paths = {}
    for name, sd in zip(names, synthetic_finetunes(pre, num_tasks, seed + 1)):
        ft_paths[name] = save_safetensors(sd, out / "checkpoints" / f"{name}.safetensors")
    print(f"[demo] tiny encoder: {sum(v.numel() for v in pre.values()):,} params, {num_tasks} synthetic fine-tunes in {out / 'checkpoints'}")
    exact = {n: {k: load_state_dict(p)[k] - pre[k] for k in pre} for n, p in ft_paths.items()}
    rows = {}
    for label, opts in SCHEMES:
        store = out / "stores" / label
        t0 = time.perf_counter()
        rc = tvq(["quantize", "--pretrained", str(pre_path), "--finetuned", *[f"{n}={p}" for n, p in ft_paths.items()],
                  *opts, "--out", str(store), "--quiet"])
        if rc:
            raise SystemExit(rc)
        dt = time.perf_counter() - t0
        with TaskVectorStore(store) as s:
            summary = summarize(s)
            qkeys = [k for k, i in s.layout.keys.items() if i.quantized] or list(s.layout.keys)
            err = sum(relative_l2_error(torch.cat([s.task_vector(n, k, pre[k]).flatten() for k in qkeys]),
                                        torch.cat([exact[n][k].flatten() for k in qkeys])) for n in names) / num_tasks
        rows[label] = {"scheme": summary["scheme"], "bits_per_param": summary["bits_per_param"],
                       "bytes": summary["bytes_on_disk"], "ratio_to_fp32": summary["ratio_to_fp32"],
                       "theoretical_ratio": summary["theoretical_ratio"], "rel_l2_error": err, "seconds": dt}
    print("[demo] tvq inspect", out / "stores" / "rtvq_b3o2")
    tvq(["inspect", str(out / "stores" / "rtvq_b3o2")])
    exported = out / "task0_finetuned_from_tvq4.safetensors"
    tvq(["export", "--store", str(out / "stores" / "tvq4"), "--task", names[0], "--pretrained", str(pre_path),
         "--finetuned-weights", "--out", str(exported)])
    rec = load_state_dict(exported)
    ft0 = load_state_dict(ft_paths[names[0]])
    export_err = max((rec[k].float() - ft0[k].float()).abs().max().item() for k in rec)
    table = format_table(rows, num_tasks)
    print()
    print(table)
    print(f"\nexported {names[0]} from TVQ-INT4: max |theta_hat - theta| = {export_err:.2e}")
    report = {"num_tasks": num_tasks, "params": sum(v.numel() for v in pre.values()), "storage": rows,
              "export_max_abs_error": export_err}
    (out / "storage.json").write_text(json.dumps(report, indent=1))
    (out / "storage.md").write_text(table + "\n")
    return report


def format_table(rows: dict, num_tasks: int) -> str:
    head = f"| scheme | bits/param/task | bytes on disk | % of {num_tasks} fp32 checkpoints | theory % | rel. L2 error of tau | quantize s |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        lines.append(f"| {r['scheme']} | {r['bits_per_param']:.3f} | {r['bytes']:,} | {100 * r['ratio_to_fp32']:.2f} | "
                     f"{100 * r['theoretical_ratio']:.2f} | {r['rel_l2_error']:.4f} | {r['seconds']:.2f} |")
    return "\n".join(lines)
