"""``tvq convert``: rewrite a checkpoint (e.g. a pickled task_vectors module) as a safetensors file."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TvqError
from ..store.io import check_output, output_errors
from ._common import add_checkpoint_options


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint (or a classification head) as safetensors",
                       description="Read a checkpoint in any format tvq reads (safetensors, torch.save state dicts, "
                                   "Lightning .ckpt, with --allow-pickle the pickled modules of the task_vectors and "
                                   "tall_masks releases) and write its tensors, prefix stripped, as one .safetensors "
                                   "file. With --head, the input is a classification head (task_vectors' "
                                   "head_<Dataset>.pt) and OUT is a head for the evaluation modules' heads_dir.")
    p.add_argument("input", metavar="IN", help="the checkpoint to read")
    p.add_argument("out", metavar="OUT.safetensors", help="the safetensors file to write")
    p.add_argument("--head", action="store_true", help="IN is a classification head: write its weight and bias")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_checkpoint_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..store.checkpoints import load_state_dict
    from ..store.import_heads import import_head
    from ..store.st_stream import save_safetensors

    src, out = Path(args.input), Path(args.out)
    if out.suffix != ".safetensors":
        raise TvqError(f"OUT {out} must end in .safetensors (e.g. {out.with_suffix('.safetensors')})")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise TvqError(f"IN and OUT are the same file ({out}); write the conversion elsewhere")
    check_output(out, args.overwrite, what="safetensors file")
    if args.head:
        if args.trust_pickle_code:
            raise TvqError("--head reads heads through the allow-list only; drop --trust-pickle-code (use --allow-pickle)")
        head = import_head(src, prefix=args.prefix, allow_pickle=args.allow_pickle)
        with output_errors(out):
            head.save(out)
        note = "" if head.normalize else " (normalize=False, recorded in the file's metadata)"
        print(f"wrote the head of {src} ({head.num_classes} classes x {head.in_features} features) to {out}{note}")
        return 0
    sd = load_state_dict(src, prefix=args.prefix, allow_pickle=args.allow_pickle, trust_pickle_code=args.trust_pickle_code)
    with output_errors(out):
        save_safetensors({k: v.contiguous() for k, v in sd.items()}, out)
    size = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"wrote {len(sd)} tensors ({size:,} bytes of data) of {src} to {out}")
    return 0
