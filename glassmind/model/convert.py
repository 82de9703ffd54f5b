"""`glassmind convert`: move a model between a glassmind run directory and a Hugging Face model directory.

    glassmind convert --from-hf DIR --out RUN    config.json + model.safetensors (+ tokenizer.json) for glassmind
    glassmind convert --to-hf RUN --out DIR      a save_pretrained directory (+ tokenizer.json)

--from-hf reads the safetensors directly (no transformers needed) unless --via transformers; either way the
weights are the same (tests pin it). The original HF config.json is kept as RUN/hf_config.json so --to-hf can
give back what a ModelConfig does not hold (special token ids, label names).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glassmind.common import GlassmindError, atomic_write_bytes, atomic_write_text, print0, run_main

HF_CONFIG_COPY = "hf_config.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glassmind convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="a Hugging Face model directory to read")
    src.add_argument("--to-hf", metavar="RUN", help="a glassmind run directory to write as a HF model")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--family", choices=("gpt2", "bert", "bart", "marian"), default=None,
                   help="with --to-hf: the HF family to write (default: inferred from the model's config)")
    p.add_argument("--via", choices=("safetensors", "transformers"), default="safetensors",
                   help="with --from-hf: read the weights directly, or load the model with transformers first")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pytorch_model.bin / .pt (pickle, which can run code) when there is no "
                        "model.safetensors; refused without it, with --via transformers too")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    return p


def _refuse_overwrite(out: Path, files: tuple[str, ...], overwrite: bool) -> None:
    present = [f for f in files if (out / f).exists()]
    if present and not overwrite:
        raise GlassmindError(f"{out} already holds {', '.join(present)}; choose another --out or pass --overwrite")


def _copy_tokenizer_from_hf(src: Path, out: Path) -> str | None:
    if (src / "tokenizer.json").exists():
        atomic_write_bytes(out / "tokenizer.json", (src / "tokenizer.json").read_bytes())
        return "tokenizer.json (copied)"
    if (src / "vocab.txt").exists():
        from glassmind import tokenizer

        tokenizer.load(src / "vocab.txt").save(out)
        return "tokenizer.json (from vocab.txt)"
    return None


def from_hf(src: Path, out: Path, *, via: str, allow_pickle: bool, overwrite: bool) -> None:
    from glassmind.model import interop, save_model

    if src.resolve() == out.resolve():
        raise GlassmindError("--out must differ from --from-hf: the two directories have different layouts")
    _refuse_overwrite(out, ("config.json", "model.safetensors"), overwrite)
    if via == "transformers":
        model = interop.from_hf(interop.load_hf_dir(src, allow_pickle=allow_pickle))
    else:
        model = interop.from_hf_dir(src, allow_pickle=allow_pickle)
    save_model(model, out)
    atomic_write_bytes(out / HF_CONFIG_COPY, (src / "config.json").read_bytes())
    tok = _copy_tokenizer_from_hf(src, out)
    name = interop.architecture_of(json.loads((src / "config.json").read_text(encoding="utf-8")))
    atomic_write_text(out / "card.md", f"# converted from Hugging Face\n\n- source: `{src}` ({name})\n"
                      f"- model: {model.config.arch}, {model.num_params():,} parameters\n"
                      f"- by: `glassmind convert --from-hf`\n")
    print0(f"wrote {out}: {name} -> glassmind {model.config.arch} ({model.num_params():,} parameters), "
           f"config.json, model.safetensors{', ' + tok if tok else ' (no tokenizer found in the source)'}")


def to_hf(run: Path, out: Path, *, family: str | None, overwrite: bool) -> None:
    from glassmind.model import interop, load_model

    if run.resolve() == out.resolve():
        raise GlassmindError("--out must differ from --to-hf: the two directories have different layouts")
    _refuse_overwrite(out, ("config.json", "model.safetensors"), overwrite)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise GlassmindError("--to-hf needs transformers: pip install 'glassmind[hf]'") from None
    model = load_model(run)
    base = None
    if (run / HF_CONFIG_COPY).exists():
        base = json.loads((run / HF_CONFIG_COPY).read_text(encoding="utf-8"))
    hf = interop.to_hf(model, family, base_config=base)
    hf.save_pretrained(str(out))
    wrote = "tokenizer.json" if (run / "tokenizer.json").exists() else None
    if wrote:
        atomic_write_bytes(out / "tokenizer.json", (run / "tokenizer.json").read_bytes())
    print0(f"wrote {out}: {type(hf).__name__} ({model.num_params():,} parameters), config.json, "
           f"model.safetensors{', tokenizer.json' if wrote else ''}")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.from_hf:
        src = Path(args.from_hf)
        if not src.is_dir():
            raise GlassmindError(f"{src} is not a directory: pass a Hugging Face model directory to --from-hf")
        from_hf(src, out, via=args.via, allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    else:
        run = Path(args.to_hf)
        if not run.is_dir():
            raise GlassmindError(f"{run} is not a directory: pass a glassmind run directory to --to-hf")
        to_hf(run, out, family=args.family, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)
