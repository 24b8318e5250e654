"""`kprune validate SPEC...`: schema and semantic checks; never opens a model, never imports TensorFlow."""
from __future__ import annotations

from kprune_batch.commands import EXIT_INVALID, Result
from kprune_batch.errors import SpecError
from kprune_batch.spec import STDIN, STDIN_NAME, read_spec_arg


def validate(files: list[str]) -> Result:
    """Every problem of every file, file by file in the order given (each file's sorted by
    position); '-' reads one spec from stdin. Exit 2 if any file is invalid."""
    if files.count(STDIN) > 1:  # the second read would see an empty stream
        return Result(err=["error: '-' (stdin) can be given only once"], return_code=EXIT_INVALID)
    result = Result()
    checked: list[dict[str, object]] = []
    errors: list[dict[str, object]] = []
    result.data = {"valid": True, "files": checked, "errors": errors}
    for file in files:
        try:
            spec = read_spec_arg(file)
        except SpecError as exc:
            result.err.extend(exc.lines())
            result.return_code = EXIT_INVALID
            result.data["valid"] = False
            checked.append({"file": STDIN_NAME if file == STDIN else file, "valid": False,
                            "models": None, "layer_entries": None})
            # every problem, also past the 30 the text shows; line and col 1-based, null when
            # the file cannot be read at all; path null when the problem is not at a JSON path
            errors.extend({"file": p.file or file, "line": p.line if p.line > 0 else None,
                           "col": p.col if p.line > 0 else None, "path": p.path or None,
                           "message": p.message} for p in exc.problems)
            continue
        layers = sum(len(m.layers) for m in spec.models)
        checked.append({"file": spec.file, "valid": True, "models": len(spec.models),
                        "layer_entries": layers})
        result.out.append(f"{spec.file}: ok ({len(spec.models)} model(s), {layers} layer entr"
                          f"{'y' if layers == 1 else 'ies'})")
    return result
