"""`kprune validate SPEC...`: schema and semantic checks; never opens a model, never imports TensorFlow."""
from __future__ import annotations

from kprune_batch.commands import EXIT_INVALID, Result
from kprune_batch.errors import SpecError
from kprune_batch.spec import STDIN, read_spec_arg


def validate(files: list[str]) -> Result:
    """Every problem of every file, file by file in the order given (each file's sorted by
    position); '-' reads one spec from stdin. Exit 2 if any file is invalid."""
    if files.count(STDIN) > 1:  # the second read would see an empty stream
        return Result(err=["error: '-' (stdin) can be given only once"], return_code=EXIT_INVALID)
    result = Result()
    for file in files:
        try:
            spec = read_spec_arg(file)
        except SpecError as exc:
            result.err.extend(exc.lines())
            result.return_code = EXIT_INVALID
            continue
        layers = sum(len(m.layers) for m in spec.models)
        result.out.append(f"{spec.file}: ok ({len(spec.models)} model(s), {layers} layer entr"
                          f"{'y' if layers == 1 else 'ies'})")
    return result
