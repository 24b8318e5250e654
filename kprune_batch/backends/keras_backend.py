"""The Keras backend: loads the model with Keras (safe mode on), edits variables, saves reproducibly."""
from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any

import numpy as np

from kprune_batch.errors import ModelError, first_line
from kprune_batch.graph import build_graph
from kprune_batch.quiet import import_keras, native_stderr_silenced

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_MISSING = object()


def _variable_names(layer: Any) -> list[str]:
    """A layer's variable names, the same in every process: a variable created without a name
    (ConvNeXt's LayerScale) is 'variable', uniquified per process as 'variable_1', 'variable_2',
    ... (keras/src/backend/common/variables.py auto-names it), so those are renamed by their
    order in the layer: 'variable', 'variable_1', ..."""
    names, unnamed = [], 0
    for var in layer.weights:
        name = var.name
        if name == "variable" or name.startswith("variable_") and name[9:].isdigit():
            name = "variable" if unnamed == 0 else f"variable_{unnamed}"
            unnamed += 1
        names.append(name)
    return names


def _describe_load_error(exc: BaseException, path: str) -> tuple[str, str | None]:
    # the first line, long lists capped (errors.first_line); the keywords below are read from
    # the whole text
    text = f"{type(exc).__name__}: {first_line(exc, limit=10 ** 9)}"
    lowered = f"{type(exc).__name__}: {exc}".lower()
    if "lambda" in lowered and ("safe_mode" in lowered or "unsafe" in lowered):
        return ("the model contains a Lambda layer, whose Python code Keras refuses to load in safe "
                "mode; kprune always loads models with safe_mode=True",
                "replace the Lambda with a registered layer")
    if "unknown layer" in lowered or "could not locate" in lowered or "custom_objects" in lowered:
        first = text.splitlines()[0][:300]
        return (f"the model uses a layer class Keras does not know ({first})",
                "kprune loads only built-in Keras layers")
    if isinstance(exc, (zipfile.BadZipFile, OSError)) or "truncated" in lowered \
            or "signature" in lowered or "not a zip" in lowered:
        return (f"the file is not a readable Keras model ({text.splitlines()[0][:200]})",
                "check the file is a complete .keras or .h5 model")
    missing = re.search(r"there is no item named '([^']+)' in the archive", str(exc), re.I)
    if isinstance(exc, KeyError) and missing:
        # zipfile's KeyError for a member saving_lib opens (config.json, model.weights.h5)
        return (f"the .keras archive has no '{missing.group(1)}' member (not a complete "
                "Keras model)", "re-save it with keras.saving.save_model")
    if "expected a model.weights.h5 or model.weights.npz" in lowered:
        # saving_lib's line when the archive holds no weights member
        return ("the .keras archive has no 'model.weights.h5' member (not a complete Keras "
                "model)", "re-save it with keras.saving.save_model")
    return f"Keras could not load the model ({text.splitlines()[0][:300]})", None


def _refuse_zip_bomb(path: str, model_name: str) -> None:
    """Keras reads config.json whole and refuses only members over 4 GiB (saving_lib.
    _reject_zip_bomb): the member sizes in the zip directory are checked first, by the rule
    the direct backend applies, so both backends refuse a bomb with the same line. A file
    that is not a readable zip is left to Keras, whose error says so."""
    from kprune_batch.backends.direct import zip_member_problem

    try:
        with zipfile.ZipFile(path) as zf:
            problem = zip_member_problem(zf)
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    if problem is not None:
        raise ModelError(problem, model=model_name, file=path,
                         hint="kprune does not read such a file")


def find_node(model: Any, path: str) -> Any:
    """The layer or operation at a graph path ('outer/inner'), as LayerGraph names them.

    `get_layer` searches `model.layers`, which leaves out a Functional's operation nodes
    (keras/src/models/functional.py `layers` keeps Layer instances only) and a Sequential's
    InputLayer (keras/src/models/sequential.py `layers` drops `_layers[0]` when it is one);
    `operations` and `_layers` hold every node the config lists.
    """
    obj = model
    for part in path.split("/"):
        if type(obj).__name__ == "Sequential":
            nodes = list(getattr(obj, "_layers", None) or obj.layers)
        else:
            nodes = list(getattr(obj, "operations", None) or obj.layers)
        found = next((n for n in nodes if n.name == part), None)
        if found is None:
            raise ValueError(f"no layer or operation named '{part}' in model '{obj.name}'")
        obj = found
    return obj


class KerasModelWeights:
    """A model loaded with keras.saving.load_model; the reference backend."""

    backend = "keras"

    def __init__(self, path: str, model_name: str):
        self.path = path
        self.model_name = model_name
        self.hashes: tuple[str, str] | None = None  # Keras writes the file: hashed afterwards
        if path.endswith(".keras"):
            _refuse_zip_bomb(path, model_name)
        keras = import_keras()
        try:
            # A legacy .h5 is loaded without compiling: Keras 3 cannot re-create some compile
            # configs it wrote itself (e.g. loss "mse" -> keras.metrics.mse); save() copies the
            # file's training_config and optimizer_weights over verbatim instead.
            with native_stderr_silenced():
                self.model = keras.saving.load_model(path, compile=path.endswith(".keras"),
                                                     safe_mode=True)
        except Exception as exc:  # Keras raises many types for bad files; all end this model only
            message, hint = _describe_load_error(exc, path)
            raise ModelError(message, model=model_name, file=path, hint=hint) from exc
        if not isinstance(self.model, keras.Model):
            raise ModelError("the file does not hold a Keras model", model=model_name, file=path)
        try:
            config = keras.saving.serialize_keras_object(self.model)
            self.graph = build_graph(config)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ModelError(
                f"the model's architecture cannot be read as a Functional or Sequential graph "
                f"({exc})", model=model_name, file=path,
                hint="subclassed models are not supported") from exc

    def _layer(self, layer_path: str) -> Any:
        return find_node(self.model, layer_path)

    def variables(self, layer_path: str) -> dict[str, np.ndarray]:
        layer = self._layer(layer_path)
        return {n: np.array(v.numpy(), copy=True)
                for n, v in zip(_variable_names(layer), layer.weights, strict=True)}

    def assign(self, layer_path: str, name: str, value: np.ndarray) -> None:
        layer = self._layer(layer_path)
        for var, var_name in zip(layer.weights, _variable_names(layer), strict=True):
            if var_name == name:
                if tuple(var.shape) != tuple(value.shape):
                    raise ValueError(f"shape mismatch for {layer_path}/{name}")
                var.assign(value.astype(var.dtype))
                return
        raise KeyError(f"{layer_path} has no variable {name}")

    def save(self, tmp_path: str) -> None:
        suffix = ".keras" if self.path.endswith(".keras") else ".h5"
        staging = tmp_path + suffix  # Keras picks the format from the file name's ending
        try:
            with native_stderr_silenced():
                self.model.save(staging)
            if suffix == ".keras":
                _reproducible_zip(staging, tmp_path, like=self.path)
            else:
                _copy_training_state(self.path, staging)
                os.replace(staging, tmp_path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)

    def matches(self, dest: str) -> bool | None:
        return None  # Keras writes the whole file: only writing it tells

    def close(self) -> None:
        self.model = None


def _copy_training_state(src: str, dest: str) -> None:
    """Copy a legacy .h5's compile config and optimizer state from the input, unchanged.

    keras/src/legacy/saving/legacy_h5_format.py keeps them in the `training_config` attribute
    and the `optimizer_weights` group of the file's root.
    """
    import h5py

    with h5py.File(src, "r") as fin, h5py.File(dest, "r+") as fout:
        if "training_config" in fin.attrs:
            fout.attrs["training_config"] = fin.attrs["training_config"]
        if "optimizer_weights" in fin and "optimizer_weights" not in fout:
            fin.copy(fin["optimizer_weights"], fout, name="optimizer_weights")


def _reproducible_zip(src: str, dest: str, like: str) -> None:
    """Rewrite Keras's zip so that it carries no save-time timestamp.

    keras/src/saving/saving_lib.py writes metadata.json with `date_saved` = now and the weights
    entry with the current time; both are taken from the input file instead, so the same spec
    on the same inputs gives byte-identical outputs. Entry order and compression are kept.
    """
    with zipfile.ZipFile(like) as original:
        stamps = {info.filename: info.date_time for info in original.infolist()}
        try:
            date_saved = json.loads(original.read("metadata.json")).get("date_saved")
        except (KeyError, ValueError):
            date_saved = None
        try:
            compile_config = json.loads(original.read("config.json")).get("compile_config")
        except (KeyError, ValueError):
            compile_config = _MISSING
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json" and compile_config is not _MISSING:
                # Keras re-serialises the compiled optimizer object on save (Trainer.
                # get_compile_config -> CompileConfig.serialize), so under KERAS_BACKEND=torch
                # the output named keras.src.backend.torch.optimizers.TorchAdam, a class only
                # the torch backend has; the input's compile config is carried over verbatim,
                # so the output loads under every backend the input loads under
                config = json.loads(data)
                if "compile_config" in config or compile_config is not None:
                    config["compile_config"] = compile_config
                data = json.dumps(config).encode()
            if info.filename == "metadata.json" and date_saved is not None:
                meta = json.loads(data)
                meta["date_saved"] = date_saved
                data = json.dumps(meta).encode()
            out = zipfile.ZipInfo(info.filename, date_time=stamps.get(info.filename, _ZIP_EPOCH))
            out.compress_type = info.compress_type
            out.external_attr = info.external_attr
            out.create_system = info.create_system
            zout.writestr(out, data)
