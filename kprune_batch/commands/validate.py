"""`kprune validate SPEC...`: schema and semantic checks; never opens a model, never imports TensorFlow."""
from __future__ import annotations

from kprune_batch.commands import EXIT_INVALID, Result
from kprune_batch.errors import SpecError
from kprune_batch.spec import read_spec


def validate(files: list[str]) -> Result:
    result = Result()
    for file in files:
        try:
            spec = read_spec(file)
        except SpecError as exc:
            result.err.extend(exc.lines())
            result.return_code = EXIT_INVALID
            continue
        layers = sum(len(m.layers) for m in spec.models)
        result.out.append(f"{file}: ok ({len(spec.models)} model(s), {layers} layer entr"
                          f"{'y' if layers == 1 else 'ies'})")
    return result
