"""Re-stamp a model folder's calibrations, made before the full-weight fingerprint, with what they now record.

Until issue 26 the model fingerprint hashed a strided sample of each weight (rounded to bfloat16) and calibrations
recorded neither the weights' dtype nor the meta head. Such a calibration no longer matches its own model
(``ModelMismatchError``). This script re-stamps one only when the model is provably the one it was made for: the
folder's model, loaded in the dtype the table records, must give the *old* fingerprint the files record. It then
writes the new provenance (:func:`hf_safe_exit.risk.provenance.record_provenance`: fingerprint, dtype, and the
meta head's fingerprint when the measure reads it) into the loss table, ``risk_control.json`` and
``evaluation.json`` of every task under ``<model>/calibration/``, and checks that the result loads and passes
its integrity checks. The losses, λ̂ and certificates are not touched. ::

    python scripts/refingerprint.py hf_safe_exit/default_model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch


def old_fingerprint(model) -> str:
    """The fingerprint of hf_safe_exit before issue 26 (strided bfloat16 sample; kept here only to migrate)."""
    keys = ("model_type", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "vocab_size",
            "feed_forward_proj", "tie_word_embeddings", "relative_attention_num_buckets")
    digest = hashlib.sha256(json.dumps({k: getattr(model.config, k, None) for k in keys}, sort_keys=True).encode())
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or name.startswith("meta_head."):
            continue
        seen.add(id(param))
        flat = param.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 1024)][:1024].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _write_json(path: Path, data: dict, indent: int) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def restamp(model_dir: Path) -> None:
    from transformers import T5ForConditionalGeneration

    from hf_safe_exit import EarlyExitConfig, LossTable
    from hf_safe_exit.risk.provenance import record_provenance
    from hf_safe_exit.risk.store import clear_store_cache, find_stored

    for task_dir in sorted(p for p in (model_dir / "calibration").iterdir() if p.is_dir()):
        table_path = task_dir / "early_exit_calibration.npz"
        table = LossTable.load(table_path)
        dtype = getattr(torch, table.metadata.get("dtype", "float32"))
        model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        recorded = table.metadata.get("model_fingerprint")
        if old_fingerprint(model) != recorded:
            sys.exit(f"{table_path}: records fingerprint {recorded}, which is not this model's by the old "
                     f"algorithm ({old_fingerprint(model)}): it was made for another model; recollect instead.")
        config = EarlyExitConfig.from_dict(table.metadata, strict=False) if table.metadata.get("measure") else None
        provenance = record_provenance(model, config)
        LossTable(table.lambdas, table.losses, table.bounds, table.extras,
                  {**table.metadata, **provenance}).save(table_path)
        rc_path = task_dir / "risk_control.json"
        if rc_path.is_file():
            data = json.loads(rc_path.read_text(encoding="utf-8"))
            data["calibration"].update(provenance)
            data["certificate"]["model_fingerprint"] = provenance["model_fingerprint"]
            _write_json(rc_path, data, indent=2)  # as Calibration.save_pretrained
        ev_path = task_dir / "evaluation.json"
        if ev_path.is_file():
            data = json.loads(ev_path.read_text(encoding="utf-8"))
            if isinstance(data.get("metadata"), dict):
                data["metadata"].update(provenance)
            _write_json(ev_path, data, indent=1)  # as `hf-safe-exit evaluate`
        clear_store_cache()
        stored = find_stored(model, task_dir.name)  # loads both files and runs the integrity checks, incl. a refit
        print(f"{task_dir.name}: {recorded} -> {provenance} ({'table + risk_control.json' if stored.table else '?'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    restamp(parser.parse_args().model_dir)


if __name__ == "__main__":
    main()
