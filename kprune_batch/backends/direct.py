"""The direct backend: edits weight datasets in a copy of the model file with h5py, never importing Keras.

Only the layers kprune may touch (convolutions and BatchNormalization) are mapped, and every
mapping is derived the way Keras 3 writes the file and then checked against the file itself
(names stored by Keras, dataset count and shapes implied by the layer config). Any doubt raises
DirectBackendUnsupported, and the caller falls back to the Keras backend: never a guess.
Storage facts are proven too: the file must hold only plain hard-linked datasets stored inside
it (what Keras's safe loader accepts), each edited dataset's bytes its own (no other dataset or
link reaches them), the one zip member Keras reads, at the offsets Python's zipfile reads, and
(legacy .h5) layer groups in the order Keras assigns them. A file that is unsafe for either
backend (a zip bomb) fails the model with ModelError instead: falling back would not help.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import zipfile
from typing import Any

import h5py
import numpy as np

from kprune_batch.crc import linear, patched_crc32
from kprune_batch.errors import ModelError
from kprune_batch.families import expected_shapes, variable_names
from kprune_batch.files import CorruptInput, copy_patched, patched_equals
from kprune_batch.graph import MODEL_CLASSES, ConfigError, build_graph, operation_module


class DirectBackendUnsupported(Exception):
    """The direct backend cannot prove its mapping for this file; use the Keras backend."""


# Members read whole into memory (by kprune and by Keras) are bounded. keras/src/saving/
# saving_lib.py refuses only members over 4 GiB that expand over 100x (_reject_zip_bomb), so
# a 1 GiB config.json deflated into 1 MB would still be read whole: kprune refuses JSON
# members over _JSON_MEMBER_MAX_BYTES (a ResNet50 config.json is ~100 KB) and any member that
# expands over Keras's 100x once it is over _EXPANSION_FLOOR_BYTES (Keras writes members
# stored, 1:1; a re-zipped honest config deflates ~10x).
_JSON_MEMBERS = ("config.json", "metadata.json")
_JSON_MEMBER_MAX_BYTES = 256 << 20
_MEMBER_MAX_EXPANSION = 100  # saving_lib._ZIP_MEMBER_MAX_EXPANSION
_EXPANSION_FLOOR_BYTES = 1 << 20
# The members the direct backend reads; saving_lib reads them with zipfile, whose getinfo()
# holds the *last* central directory entry of a name: a second entry is refused, not guessed.
_RELIED_ON = ("config.json", "metadata.json", "model.weights.h5")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def zip_member_problem(zf: zipfile.ZipFile) -> str | None:
    """Why a .keras archive must not be read at all (a decompression bomb), or None. Both
    backends ask before reading any member, so both refuse with the same line."""
    for info in zf.infolist():
        if info.filename in _JSON_MEMBERS and info.file_size > _JSON_MEMBER_MAX_BYTES:
            return (f"zip member '{info.filename}' declares {_size(info.file_size)}, over the "
                    f"{_size(_JSON_MEMBER_MAX_BYTES)} kprune reads into memory")
        if info.file_size > _EXPANSION_FLOOR_BYTES and \
                info.file_size > _MEMBER_MAX_EXPANSION * info.compress_size:
            return (f"zip member '{info.filename}' declares {_size(info.file_size)} but stores "
                    f"only {_size(info.compress_size)} (a decompression bomb?)")
    return None


def _zip_layout_problem(path: str, zf: zipfile.ZipFile) -> str | None:
    """Why the archive's bytes are not provably where zipfile (and so Keras) reads them: a
    duplicate entry of a member the backend relies on, bytes before the archive (zipfile then
    shifts every offset by the prefix), a local header that is not its entry's, or members
    whose bytes overlap (patching one would change another)."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    for name in _RELIED_ON:
        if names.count(name) > 1:
            return f"the archive has {names.count(name)} entries named {name}"
    with open(path, "rb") as fh:
        size, tail, end = _zip_tail(fh)
        tail_len = len(tail)
        if end < 0 or end + 22 > len(tail):
            return "the zip end record cannot be read"
        cd_size, cd_offset = struct.unpack("<II", tail[end + 12:end + 20])
        # zipfile.py _RealGetContents: concat = end position - size - offset of the directory,
        # added to every header offset; 0 unless bytes were put before the archive
        if cd_offset != 0xFFFFFFFF and size - tail_len + end - cd_size - cd_offset != 0:
            return "the archive has bytes before its first entry (its offsets are shifted)"
        spans = []
        for info in infos:
            fh.seek(info.header_offset)
            header = fh.read(30)
            if header[:4] != b"PK\x03\x04":
                return f"zip entry {info.filename} has no local header where its entry says"
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            if fh.read(name_len) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800
                                                             else "cp437"):
                return f"zip entry {info.filename}'s local header names another file"
            stop = info.header_offset + 30 + name_len + extra_len + info.compress_size
            spans.append((info.header_offset, stop, info.filename))
    spans.sort()
    for (_, stop, name), (start, _, other) in zip(spans, spans[1:] + [(zf.start_dir, 0, "")]):
        if stop > start:
            return f"zip entry {name}'s bytes overlap {other or 'the central directory'}"
    return None


def _snake(name: str) -> str:
    """keras/src/utils/naming.py to_snake_case."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique(name: str, used: dict[str, int]) -> str:
    """keras/src/saving/saving_lib.py _get_unique_name."""
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


def _config_problems(model_config: dict[str, Any]) -> None:
    """Refuse what Keras's safe mode would refuse or what kprune cannot prove (custom classes)."""
    def walk(layer: dict[str, Any]) -> None:
        if layer.get("class_name") == "Lambda":
            raise DirectBackendUnsupported("the model contains a Lambda layer")
        module = layer.get("module") or ""
        if layer.get("registered_name") not in (None, layer.get("class_name")) or (
                module and not module.startswith("keras")):
            raise DirectBackendUnsupported(f"layer class {layer.get('class_name')} is not a "
                                           f"built-in Keras class")
        cfg = layer.get("config")
        if isinstance(cfg, dict):
            policy = cfg.get("dtype")
            if isinstance(policy, dict) and "Quantized" in str(policy.get("class_name")):
                raise DirectBackendUnsupported("quantized layers are not supported")
            for child in cfg.get("layers", []) if layer.get("class_name") in MODEL_CLASSES else []:
                walk(child)

    walk(model_config)


def _variable_dtype(config: dict[str, Any]) -> np.dtype | None:
    """The dtype of the layer's variables, from its dtype policy (keras/src/dtype_policies/
    dtype_policy.py: "mixed_*" policies keep float32 variables), or None if not provable
    (no policy recorded: Keras would use the global one; a class or dtype numpy lacks)."""
    policy = config.get("dtype")
    if isinstance(policy, dict) and policy.get("class_name") in ("DTypePolicy",
                                                                  "FloatDTypePolicy", "Policy"):
        policy = (policy.get("config") or {}).get("name")
    if not isinstance(policy, str):
        return None
    name = "float32" if policy.startswith("mixed_") else policy
    return np.dtype(name) if name in ("float16", "float32", "float64") else None


def _attr_list(group: h5py.Group, name: str) -> list[str]:
    """legacy_h5_format.load_attributes_from_hdf5_group: the attribute, or its chunks name0,
    name1, ... (a long list is split over several attributes)."""
    if name in group.attrs:
        raw = list(group.attrs[name])
    else:
        raw, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            raw += list(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in raw]


def _output_names(spec: Any) -> list[str]:
    """Layer names of an output_layers entry ([name, node, tensor] or a nested list of them)."""
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], str):
        return [spec[0]]
    if isinstance(spec, (list, tuple)):
        return [name for item in spec for name in _output_names(item)]
    if isinstance(spec, dict):
        return [name for item in spec.values() for name in _output_names(item)]
    return []


def _functional_layer_order(config: dict[str, Any], sources: dict[str, list[str]]) -> list[str]:
    """model.layers of a Functional whose layers are each called once, as keras/src/ops/
    function.py map_graph orders them: a depth-first walk from the outputs (_build_map) numbers
    the layers and gives each a depth (longest path to an output); layers by decreasing depth,
    ties by walk number; unused inputs last at depth 0."""
    numbers: dict[str, int] = {}
    finished: list[str] = []  # Keras's nodes_in_decreasing_depth
    done: set[str] = set()
    in_progress: set[str] = set()

    def walk(name: str) -> None:
        stack = [(name, False)]
        while stack:
            layer, leaving = stack.pop()
            if leaving:
                in_progress.discard(layer)
                finished.append(layer)
                done.add(layer)
                continue
            if layer in done:
                continue
            if layer in in_progress:
                raise DirectBackendUnsupported(f"layer '{layer}' is part of a cycle")
            numbers.setdefault(layer, len(numbers))
            in_progress.add(layer)
            stack.append((layer, True))
            stack.extend((src, False) for src in reversed(sources[layer]))

    for output in _output_names(config["config"].get("output_layers")):
        walk(output)
    depth: dict[str, int] = {}
    for layer in reversed(finished):
        d = depth.setdefault(layer, 0)
        for src in sources[layer]:
            depth[src] = max(depth.get(src, 0), d + 1)
    for name in _output_names(config["config"].get("input_layers")):
        if name not in depth:
            depth[name], numbers[name] = 0, -1
    return sorted(depth, key=lambda n: (-depth[n], numbers[n]))


class DirectModelWeights:
    """A model file opened with h5py; edits are applied to a copy of its weights when saved."""

    backend = "direct"

    def __init__(self, path: str, model_name: str, layout: DirectModelWeights | None = None):
        """Open `path`; with `layout`, a file written from `layout`'s input by save() (the same
        zip entries and HDF5 structure, only data bytes patched): its proven mapping is reused
        instead of being derived again, which is most of the cost of opening a large model."""
        self.path = path
        self.model_name = model_name
        self._edits: dict[str, np.ndarray] = {}  # dataset path -> new value
        # dataset path -> crc.linear() of its stored bytes, taken as the selection reads them
        # (only where the read converts nothing: then the array's bytes are the file's), so that
        # the new CRC of the weights member needs no second read of the old bytes
        self._old_linear: dict[str, int] = {}
        self._keep_linear = layout is None and path.endswith(".keras")  # a copy is never saved
        self._planned: Any = _UNPLANNED  # _file_patches() for the current edits
        self._blob: bytes | None = None  # the weights, only for a compressed .keras member
        self._zip: zipfile.ZipFile | None = None
        self._window: _Window | None = None
        self.hashes: tuple[str, str] | None = None  # sha256 of (input, output) if save() hashed
        # every layer's HDF5 group (.keras) or weight dataset list (.h5), for stored_variables()
        self._groups: dict[str, str] = {}
        self._dense: dict[str, dict[str, str]] | None = None  # _named_dense(), worked out once
        # the mapped datasets' low-level handles, opened once: a name lookup and h5py's
        # high-level wrappers cost ~40 us per access, and a ranking over every conv of ResNet50
        # reads, assigns and locates each of its ~320 mapped datasets (~1,100 accesses)
        self._ids: dict[str, Any] = {}
        # what _check_storage's walk found, by path without the leading '/': every object's
        # type, every dataset's open handle (mapping then looks them up instead of resolving
        # each name again through h5py's high-level wrappers, ~20 us a step)
        self._kinds: dict[str, int] = {}
        self._found: dict[str, Any] = {}
        try:
            if layout is not None:
                self.graph, self._datasets = layout.graph, layout._datasets
                self._groups = layout._groups
                self._open_file()
            elif path.endswith(".keras"):
                self._open_keras_zip()
            else:
                self._open_h5()
        except (DirectBackendUnsupported, ModelError):
            self.close()
            raise
        except ConfigError as exc:  # no Keras wrote this config: Keras refuses it too, less clearly
            self.close()
            raise ModelError(str(exc), model=model_name, file=path) from None
        except (OSError, KeyError, ValueError, TypeError, IndexError, zipfile.BadZipFile,
                RecursionError) as exc:  # RecursionError: json's, on a crafted deep nesting
            self.close()
            raise DirectBackendUnsupported(f"cannot read the file directly ({exc})") from exc

    # --- opening ---------------------------------------------------------------------------

    def _open_keras_zip(self) -> None:
        self._zip = zipfile.ZipFile(self.path)
        bomb = zip_member_problem(self._zip)
        if bomb is not None:
            raise ModelError(bomb, model=self.model_name, file=self.path,
                             hint="kprune does not read such a file")
        names = self._zip.namelist()
        if "model.weights.h5" not in names or any(n.endswith(".json") and "weights" in n
                                                  for n in names):
            raise DirectBackendUnsupported("no single model.weights.h5 (sharded weights?)")
        problem = _zip_layout_problem(self.path, self._zip)
        if problem is not None:
            raise DirectBackendUnsupported(problem)
        config = json.loads(self._zip.read("config.json"))
        self.graph = build_graph(config)  # first: it refuses a malformed config, named
        _config_problems(config)
        self._open_file()
        self._check_storage()  # first: a link or foreign storage is named as such
        self._datasets = self._map_keras(config)
        self._forget_walk()

    def _open_file(self) -> None:
        """The HDF5 weights of the file (for .keras: the weights member, read in place)."""
        if not self.path.endswith(".keras"):
            self._h5 = h5py.File(self.path, "r")
            self._limit = os.path.getsize(self.path)
            return
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        info = self._zip.getinfo("model.weights.h5")
        start = _member_data_start(self.path, info)
        if info.compress_type == zipfile.ZIP_STORED and start is not None:
            # Keras stores the weights uncompressed: h5py reads them where they lie in the zip
            # through a window on the file (O(1) seeks), so no model is loaded into memory.
            self._window = _Window(self.path, start, info.file_size)
            self._h5 = h5py.File(self._window, "r")
        else:
            self._blob = self._zip.read(info)
            self._h5 = h5py.File(io.BytesIO(self._blob), "r")
        self._limit = info.file_size

    def _map_keras(self, config: dict[str, Any]) -> dict[str, dict[str, str]]:
        """layer path -> {variable: dataset path}, as saving_lib._save_state walks the model."""
        mapping: dict[str, dict[str, str]] = {}

        def walk(model: dict[str, Any], prefix: str, inner: str) -> None:
            layers = model["config"]["layers"]
            if model.get("class_name") == "Sequential" and layers and \
                    layers[0].get("class_name") == "InputLayer":
                layers = layers[1:]  # Sequential.layers leaves out its InputLayer
            used: dict[str, int] = {}
            for layer in layers:
                name = layer.get("name") or layer["config"]["name"]
                if operation_module(layer) is not None:
                    # an operation node is not a layer: saving_lib saves `model.layers`, which
                    # leaves it out, so it has no group and takes no number (graph.py)
                    continue
                where = f"{inner}/layers/{_unique(_snake(layer['class_name']), used)}"
                vars_group = self._vars_group(where)
                if vars_group is not None:  # the usual file: the layer's group holds a group vars
                    group = None
                    stored = vars_group.attrs.get("name")
                else:  # anything else, as h5py's high-level API sees it
                    group = self._h5.get(where)
                    stored = None
                    if group is not None and "vars" in group:
                        vars_group = group["vars"]
                        stored = vars_group.attrs.get("name")
                if stored is None or str(stored) != name:
                    # Keras 3 records each layer's name beside its variables; without that
                    # (older files) or with a different name, the walk is not proven.
                    raise DirectBackendUnsupported(
                        f"cannot confirm where layer '{prefix}{name}' is stored ({where})")
                self._groups[prefix + name] = where
                if layer.get("class_name") in MODEL_CLASSES:
                    walk(layer, f"{prefix}{name}/", where)
                    continue
                names = variable_names(layer["class_name"], layer.get("config", {}))
                if names is None:
                    continue
                count = len(vars_group)
                # a Dense is mapped only for a removal's coupled group (families.UNITS): one
                # whose storage differs (quantized, LoRA) stays unmapped, not a reason to refuse
                member = layer["class_name"] == "Dense"
                if count != len(names):
                    if member:
                        continue
                    raise DirectBackendUnsupported(
                        f"layer '{prefix}{name}' has {count} stored variables, expected "
                        f"{len(names)}")
                datasets = {n: f"{where}/vars/{i}" for i, n in enumerate(names)}
                try:
                    mapping[prefix + name] = self._checked(layer["class_name"],
                                                           layer.get("config", {}),
                                                           layer.get("build_config") or {},
                                                           names, datasets, prefix + name)
                except DirectBackendUnsupported:
                    if not member:
                        raise

        walk(config, "", "")
        return mapping

    def _open_h5(self) -> None:
        self._open_file()
        raw = self._h5.attrs.get("model_config")
        if raw is None:
            raise DirectBackendUnsupported("no model_config in the .h5 file")
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        _config_problems(config)
        self.graph = build_graph(config)
        self._check_storage()
        root = self._h5["model_weights"]
        self._check_h5_order(config, root)
        mapping: dict[str, dict[str, str]] = {}
        for path, node in self.graph.layers.items():
            if isinstance(root.get(path), h5py.Group):
                self._groups[path] = f"model_weights/{path}"
            names = variable_names(node.class_name, node.config)
            if names is None:
                continue
            group = root.get(path)
            if not isinstance(group, h5py.Group):
                raise DirectBackendUnsupported(f"no weights group for layer '{path}'")
            # load_weights_from_hdf5_group assigns the group's datasets by position, in
            # weight_names order, to the layer's legacy weights (trainable, then the others:
            # for every mapped class that is creation order, `names`): they are proven only
            # if position i is named {layer}/{names[i]}.
            stored = {}
            for weight in _attr_list(group, "weight_names"):
                owner, _, var = weight.split(":")[0].rpartition("/")
                stored.setdefault(var if owner == path else "", f"model_weights/{path}/{weight}")
            member = node.class_name == "Dense"  # see the .keras walk
            if list(stored) != names or len(_attr_list(group, "weight_names")) != len(names):
                if member:
                    continue
                raise DirectBackendUnsupported(f"cannot map the weights of layer '{path}'")
            try:
                mapping[path] = self._checked(node.class_name, node.config, node.build_config,
                                              names, stored, path)
            except DirectBackendUnsupported:
                if not member:
                    raise
        self._datasets = mapping
        self._forget_walk()

    def _forget_walk(self) -> None:
        """Drop what _check_storage found once the mapping is made (the mapped datasets' handles
        stay in _ids): the rest would stay open, and be closed one by one, until close()."""
        self._kinds.clear()
        self._found.clear()

    def _check_h5_order(self, config: dict[str, Any], root: h5py.Group) -> None:
        """keras/src/legacy/saving/legacy_h5_format.py load_weights_from_hdf5_group gives the
        k-th group of the `layer_names` attribute (those with weight_names) to the k-th layer of
        model.layers that has weights, whatever the names say. Mapped by name here, so the two
        orders must agree: model.layers is the config order for a Sequential and, for a
        Functional, the order of keras/src/ops/function.py map_graph (reproduced below for
        graphs whose layers are each called once; others are not proven)."""
        layers = [n for n in self.graph.layers.values() if "/" not in n.path]
        if len(layers) != len(self.graph.layers) or any(n.calls != 1 for n in layers):
            raise DirectBackendUnsupported("a legacy .h5 with nested models or shared layers: "
                                           "the order Keras assigns its weights in is not proven")
        if config.get("class_name") == "Sequential":
            order = [n.path for n in layers if n.class_name != "InputLayer"]
        else:
            order = _functional_layer_order(config, {n.path: n.sources for n in layers})
        saved = []
        for name in _attr_list(root, "layer_names"):
            group = root.get(name)
            if not isinstance(group, h5py.Group):
                raise DirectBackendUnsupported(f"layer_names lists '{name}', which has no group")
            if _attr_list(group, "weight_names"):
                saved.append(name)
        if set(saved) - set(order) or len(set(saved)) != len(saved) or \
                saved != [name for name in order if name in saved]:
            raise DirectBackendUnsupported("the file's layer_names order is not the order Keras "
                                           "gives the layers their weights in")

    def _check_storage(self) -> None:
        """Every link of the weights file is a hard link to an object with no other name, every
        dataset is stored in the file (not external, not virtual), inside it, and no two
        datasets' bytes overlap: then the bytes of an edited dataset are read by Keras as that
        variable only. Keras's safe loader (saving_lib.safe_get_h5_group/_dataset) refuses soft
        and external links and external and virtual datasets; a hard link or shared bytes it
        loads, as two variables with one value. One walk over the links, one metadata query
        per object (DenseNet121: ~1300 links, ~50 ms)."""
        h5o, h5d, h5l = h5py.h5o, h5py.h5d, h5py.h5l
        extents: list[tuple[int, int, str]] = []
        links: list[tuple[bytes, int]] = []
        # low-level visits: visititems_links builds a Python object per link (~8x slower)
        self._h5.id.links.visit(lambda name, info: links.append((name, info.type)), info=True)
        for name, kind in links:
            if kind != h5l.TYPE_HARD:
                kind_name = "SoftLink" if kind == h5l.TYPE_SOFT else "ExternalLink"
                raise DirectBackendUnsupported(f"the weights file has a {kind_name} "
                                               f"({name.decode(errors='replace')}), which Keras "
                                               f"refuses to load")
        objects: list[tuple[bytes, int, int]] = []
        h5o.visit(self._h5.id, lambda name, info: objects.append((name, info.rc, info.type)),
                  info=True)
        for raw, count, kind in objects:
            name = raw.decode(errors="replace")
            if count != 1:
                raise DirectBackendUnsupported(f"'{name}' is one object under {count} names (a "
                                               f"hard link): editing it would edit each")
            exact = name if name.encode() == raw else None  # a name that is not UTF-8: no entry
            if exact is not None:
                self._kinds[exact] = kind
            if kind != h5o.TYPE_DATASET:
                continue
            dataset = h5d.open(self._h5.id, raw)
            if exact is not None:
                self._found[exact] = dataset
            dcpl = dataset.get_create_plist()
            layout = dcpl.get_layout()
            if dcpl.get_external_count() or layout == h5d.VIRTUAL:
                raise DirectBackendUnsupported(f"dataset {name} keeps its data in other files "
                                               f"(external or virtual storage), which Keras "
                                               f"refuses to load")
            if layout == h5d.CONTIGUOUS and dataset.get_offset() is not None:
                extents.append((dataset.get_offset(), dataset.get_storage_size(), name))
            elif layout == h5d.CHUNKED:
                for i in range(dataset.get_num_chunks()):
                    chunk = dataset.get_chunk_info(i)
                    extents.append((chunk.byte_offset, chunk.size, name))
        extents.sort()
        reach, owner = 0, ""
        for start, size, name in extents:
            if start < 0 or start + size > self._limit:
                raise DirectBackendUnsupported(f"dataset {name}'s bytes lie outside the weights "
                                               f"file")
            if size and start < reach:
                raise DirectBackendUnsupported(f"datasets {owner} and {name} share bytes: "
                                               f"editing one would edit both")
            if start + size > reach:
                reach, owner = start + size, name

    def _vars_group(self, where: str) -> h5py.Group | None:
        """The group `{where}/vars` when _check_storage's walk found `where` and it as groups
        (found by that walk: every link is a hard link, every object has one name), else None."""
        path = f"{where}/vars".lstrip("/")
        if self._kinds.get(where.lstrip("/")) != h5py.h5o.TYPE_GROUP or \
                self._kinds.get(path) != h5py.h5o.TYPE_GROUP:
            return None
        return h5py.Group(h5py.h5g.open(self._h5.id, path.encode()))

    def _checked(self, class_name: str, config: dict[str, Any], build: dict[str, Any],
                 names: list[str], datasets: dict[str, str], where: str) -> dict[str, str]:
        """`datasets` after checking each exists, is floating point and has the config's shape."""
        shapes = {}
        for name, path in datasets.items():
            dsid = self._found.get(path.lstrip("/"))
            if dsid is not None:  # found by the walk: its handle is at hand (what h5py.Dataset
                tagged = h5py.h5a.exists(dsid, b"dtype")  # reads for dtype, shape and attrs)
            else:  # any other path, resolved by h5py
                ds = self._h5.get(path)
                if not isinstance(ds, h5py.Dataset):
                    raise DirectBackendUnsupported(f"{where}: no dataset {path}")
                dsid, tagged = ds.id, "dtype" in ds.attrs
            dtype = dsid.dtype
            if not np.issubdtype(dtype, np.floating):
                raise DirectBackendUnsupported(f"{where}: {name} is stored as {dtype}")
            # Keras assigns the stored values to a variable of the policy's dtype (a float64
            # kernel loads as float32: values beyond its range become inf, and H5IOStore reads
            # a dataset tagged dtype=bfloat16 as bfloat16): rules must see what Keras sees, so
            # only a dataset already of the variable's dtype is read directly.
            variable = _variable_dtype(config)
            if variable is None:
                raise DirectBackendUnsupported(f"{where}: the dtype policy "
                                               f"{config.get('dtype')!r} is not one kprune reads")
            if (dtype.kind, dtype.itemsize) != (variable.kind, variable.itemsize) or tagged:
                raise DirectBackendUnsupported(f"{where}: {name} is stored as {dtype}, Keras "
                                               f"loads it into a {variable} variable")
            shapes[name] = tuple(int(d) for d in dsid.shape)
            self._ids[path] = dsid
        expected = expected_shapes(class_name, config, build, shapes)
        if expected is None:
            raise DirectBackendUnsupported(f"{where}: cannot tell the input channels")
        for name, shape in shapes.items():
            if shape != expected.get(name):
                raise DirectBackendUnsupported(
                    f"{where}: {name} has shape {shape}, the config implies {expected.get(name)}")
        if list(datasets) != names:
            raise DirectBackendUnsupported(f"{where}: unexpected variables")
        return dict(datasets)

    # --- the ModelWeights interface ---------------------------------------------------------

    def variables(self, layer_path: str) -> dict[str, np.ndarray]:
        if layer_path not in self._datasets:
            raise KeyError(f"layer {layer_path} is not mapped by the direct backend")
        return {name: self._read(path, mapped=True)
                for name, path in self._datasets[layer_path].items()}

    def stored_variables(self, layer_path: str) -> dict[str, np.ndarray]:
        """Every array the file stores for a layer (not a nested model), for comparing two files
        layer by layer (`kprune verify`): by variable name where the mapping is proven
        (convolutions, BatchNormalization: variables(); Dense: _stored), else by the dataset's
        path inside the layer's group. Two files are read alike, so their keys agree."""
        return {name: self._read(path) for name, path in self._stored(layer_path).items()}

    def stored_shapes(self, layer_path: str) -> dict[str, tuple[int, ...]]:
        """stored_variables()'s shapes, from the HDF5 metadata (no data read)."""
        return {name: tuple(int(d) for d in self._h5[path].shape)
                for name, path in self._stored(layer_path).items()}

    def named(self, layer_path: str) -> bool:
        """Whether stored_variables() keys the layer's arrays by Keras variable name."""
        return layer_path in self._datasets or layer_path in self._named_dense()

    def _stored(self, layer_path: str) -> dict[str, str]:
        """{name: dataset path} of everything stored for the layer. .keras: saving_lib._save_state
        writes a layer's own variables to <group>/vars and recurses into its tracked attributes
        below <group> (a wrapper's inner layer), so the group's datasets are the layer's whole
        state. Legacy .h5: legacy_h5_format.load_weights_from_hdf5_group loads exactly the
        datasets its `weight_names` attribute lists."""
        if layer_path in self._datasets:
            return self._datasets[layer_path]
        dense = self._named_dense().get(layer_path)
        if dense is not None:
            return dense
        where = self._groups.get(layer_path)
        if where is None:
            return {}
        group = self._h5[where]
        if not self.path.endswith(".keras"):
            listed = {w: f"{where}/{w}" for w in _attr_list(group, "weight_names")}
            for w, path in listed.items():
                if not isinstance(self._h5.get(path), h5py.Dataset):
                    raise DirectBackendUnsupported(
                        f"cannot read layer '{layer_path}' of {os.path.basename(self.path)}: "
                        f"its weight_names list {w}, which the file does not hold")
            return listed
        found: dict[str, str] = {}
        group.visititems(lambda name, obj: found.__setitem__(name, f"{where}/{name}")
                         if isinstance(obj, h5py.Dataset) else None)
        return found

    def _named_dense(self) -> dict[str, dict[str, str]]:
        """Dense layers whose datasets are proven to be (kernel[, bias]): a removal slices a Dense
        kernel's rows and folds constants into its bias, which verify must find by name.
        keras/src/layers/core/dense.py build() creates kernel (in, units), then bias (units,)
        if use_bias; save_own_variables writes them as vars/0, vars/1 in that order
        (variable_serialization_spec[None] = ["kernel", "bias"]) and a legacy .h5 names them
        {layer}/kernel, {layer}/bias. LoRA (merged into the kernel when saved) and quantized
        layers (refused by _config_problems) are not mapped."""
        if self._dense is None:
            self._dense = {}
            for path, node in self.graph.layers.items():
                where = self._groups.get(path)
                if node.class_name != "Dense" or where is None or node.config.get("lora_rank"):
                    continue
                names = ["kernel"] + (["bias"] if node.config.get("use_bias", True) else [])
                group = self._h5[where]
                if self.path.endswith(".keras"):
                    vars_ = group.get("vars")
                    if not isinstance(vars_, h5py.Group) or sorted(vars_) != [
                            str(i) for i in range(len(names))] or len(group) != 1:
                        continue
                    datasets = {n: f"{where}/vars/{i}" for i, n in enumerate(names)}
                else:
                    weights = _attr_list(group, "weight_names")
                    if [w.split(":")[0] for w in weights] != [f"{path}/{n}" for n in names]:
                        continue
                    datasets = {n: f"{where}/{w}" for n, w in zip(names, weights)}
                dtype = _variable_dtype(node.config)
                found = [self._h5.get(d) for d in datasets.values()]
                if dtype is None or any(not isinstance(ds, h5py.Dataset) or ds.dtype != dtype
                                        or "dtype" in ds.attrs for ds in found):
                    continue
                units = node.config.get("units")
                if len(found[0].shape) != 2 or found[0].shape[1] != units or any(
                        ds.shape != (units,) for ds in found[1:]):
                    continue
                self._dense[path] = datasets
        return self._dense

    def _dataset_id(self, path: str) -> Any:
        """The low-level handle of a mapped dataset (checked by _checked; for a file opened
        with `layout`, the same path in this file), opened once."""
        dsid = self._ids.get(path)
        if dsid is None:
            dsid = self._ids[path] = h5py.h5d.open(self._h5.id, path.encode())
        return dsid

    def _read(self, path: str, mapped: bool = False) -> np.ndarray:
        # a fresh array either way, never copied twice: h5py's read already is one (~0.15 s of
        # copies for a ranking over every conv of ResNet50), and an edited dataset is not read
        edited = self._edits.get(path)
        if edited is not None:
            return edited.copy()
        if not mapped:  # anything a layer's group holds (verify): h5py's general reader
            return np.asarray(self._h5[path][()])
        # a mapped dataset is a plain floating-point array of the config's shape (_checked):
        # read whole into an array of its own stored type, what h5py's ds[()] does for it
        dsid = self._dataset_id(path)
        out = np.empty(dsid.shape, dtype=dsid.dtype)
        if out.size:
            memory = h5py.h5t.py_create(out.dtype)
            dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, out, memory)
            # H5Tequal: the file's type is the memory type, so HDF5 copied the bytes unconverted
            if self._keep_linear and path not in self._old_linear and dsid.get_type() == memory:
                self._old_linear[path] = linear(memoryview(out).cast("B"))
        return out

    def assign(self, layer_path: str, name: str, value: np.ndarray) -> None:
        path = self._datasets[layer_path][name]
        dataset = self._dataset_id(path)
        if tuple(dataset.shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for {layer_path}/{name}")
        self._planned = _UNPLANNED
        self._edits[path] = np.asarray(value, dtype=dataset.dtype)

    def save(self, tmp_path: str) -> None:
        if self.path.endswith(".keras"):
            self._save_keras_zip(tmp_path)
        else:
            shutil.copyfile(self.path, tmp_path)
            self._write_edits(tmp_path)

    def _write_edits(self, h5_path: str) -> None:
        # Writing into existing contiguous datasets rewrites only their data bytes: every other
        # byte of the file (other weights, optimizer state, attributes) stays as it was.
        with h5py.File(h5_path, "r+") as f:
            for path, value in self._edits.items():
                f[path][...] = value

    def _save_keras_zip(self, tmp_path: str) -> None:
        planned = self._file_patches()
        if planned is not None:
            try:
                self.hashes = copy_patched(self.path, tmp_path, *planned)
            except CorruptInput as exc:
                raise self._corrupt(exc) from None
            return
        self._rewrite_zip(tmp_path)

    def matches(self, dest: str) -> bool | None:
        """Whether `dest` already holds exactly what save() would write, found in one read of
        both files and nothing written (then `hashes` is set, as save() sets it); None when
        only writing would tell (a format or layout save() rewrites rather than patches)."""
        planned = self._file_patches() if self.path.endswith(".keras") else None
        if planned is None:
            return None
        try:
            hashes = patched_equals(self.path, dest, *planned)
        except CorruptInput as exc:
            raise self._corrupt(exc) from None
        if hashes is not None:
            self.hashes = hashes
        return hashes is not None

    def _corrupt(self, exc: CorruptInput) -> ModelError:
        return ModelError(str(exc), model=self.model_name, hint="restore the file from a good copy")

    def _patches(self) -> list[tuple[int, memoryview, str]] | None:
        """(offset in the weights file, new bytes, dataset path) per edit, or None if a dataset
        is not stored as one plain contiguous block (chunked, filtered, unallocated)."""
        out = []
        for path, value in self._edits.items():
            ds = self._dataset_id(path)
            dcpl = ds.get_create_plist()
            offset = ds.get_offset()
            # a view, not a copy: a ranking over every conv edits ~all of a file's kernels
            data = memoryview(np.ascontiguousarray(value, dtype=ds.dtype)).cast("B")
            if (dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_nfilters()
                    or offset is None or ds.get_storage_size() != len(data)):
                return None
            out.append((int(offset), data, path))
        return out

    def _file_patches(self) -> tuple[list[tuple[int, bytes]], tuple[int, int, int]] | None:
        """The patches that turn the .keras file into the edited one: the edited values' bytes
        where they lie, and the member's new CRC-32 in its local header and central directory
        entry (zip layout: APPNOTE.TXT 4.3.7 and 4.3.12); with the member's (start, size, CRC)
        to check on the way. None when the file cannot be patched in place (save() rewrites).
        Worked out once per set of edits: matches() and then save() both need it, and it reads
        every edited span of the input."""
        if self._planned is _UNPLANNED:
            self._planned = self._plan_file_patches()
        return self._planned

    def _plan_file_patches(self) -> tuple[list[tuple[int, bytes]], tuple[int, int, int]] | None:
        patches = self._patches()
        info = self._zip.getinfo("model.weights.h5")
        data_start = _member_data_start(self.path, info)
        if (patches is None or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x08
                or data_start is None):
            return None  # a trailing data descriptor would hold the CRC: rewrite instead
        with open(self.path, "rb") as fh:
            central = _central_entry_offset(fh, info.filename.encode())
        if central is None:
            return None
        file_patches = []
        new_crc = info.CRC
        # one span's old bytes at a time (not all at once), read into one reused buffer: a
        # fresh bytes object per span is a fresh allocation whose pages fault in as it fills
        # (a ranking over every conv of ResNet50 reads ~100 MB here)
        unseen = [len(data) for _, data, path in patches if path not in self._old_linear]
        buffer = memoryview(bytearray(max(unseen, default=0)))
        with open(self.path, "rb") as fh:
            for offset, data, path in patches:
                old: memoryview | int | None = self._old_linear.get(path)
                if old is None:  # never read (or read converted): its old bytes from the file
                    fh.seek(data_start + offset)
                    old = buffer[:fh.readinto(buffer[:len(data)])]  # short only at the end
                new_crc = patched_crc32(new_crc, info.file_size, [(offset, old, data)])
                file_patches.append((data_start + offset, data))
        crc = struct.pack("<I", new_crc)
        file_patches += [(info.header_offset + 14, crc), (central + 16, crc)]
        return file_patches, (data_start, info.file_size, info.CRC)

    def _rewrite_zip(self, tmp_path: str) -> None:
        """Fallback: rewrite the zip with an edited copy of the weights entry."""
        weights_tmp = tmp_path + ".weights.h5"
        try:
            with open(weights_tmp, "wb") as fh, self._zip.open("model.weights.h5") as src:
                shutil.copyfileobj(src, fh, 1 << 22)
            self._write_edits(weights_tmp)
            # Same entries, same order, same ZipInfo (time stamps, compression): only the
            # weights entry's bytes change.
            with zipfile.ZipFile(tmp_path, "w") as zout:
                for info in self._zip.infolist():
                    if info.filename == "model.weights.h5":
                        # a fresh ZipInfo: zout.open() rewrites offsets and sizes in the one it
                        # gets, and the source archive still reads through its own
                        entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                        entry.compress_type = info.compress_type
                        entry.external_attr = info.external_attr
                        entry.create_system = info.create_system
                        size = os.path.getsize(weights_tmp)
                        with open(weights_tmp, "rb") as src, zout.open(
                                entry, "w", force_zip64=size >= 1 << 31) as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
                    else:
                        zout.writestr(info, self._zip.read(info), compress_type=info.compress_type)
        finally:
            if os.path.exists(weights_tmp):
                os.unlink(weights_tmp)

    def close(self) -> None:
        getattr(self, "_ids", {}).clear()  # h5py's close closes them: never used after it
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            h5.close()
            self._h5 = None
        for name in ("_zip", "_window"):
            handle = getattr(self, name, None)
            if handle is not None:
                handle.close()
                setattr(self, name, None)


_UNPLANNED = object()


_PREADV = hasattr(os, "preadv")


class _Window:
    """A read-only file object over bytes [start, start + size) of a file, for h5py."""

    def __init__(self, path: str, start: int, size: int):
        self._fh = open(path, "rb")
        self._fd = self._fh.fileno()
        self._start, self._size, self._pos = start, size, 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        # h5py seeks before every read (SEEK_SET): that case first, nothing built per call
        if whence == os.SEEK_SET:
            self._pos = offset
        else:
            self._pos = offset + (self._pos if whence == os.SEEK_CUR else self._size)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        self._fh.seek(self._start + self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        # h5py reads all HDF5 metadata through here (~2000 small reads for ResNet50): one
        # positioned read straight into its buffer, not a seek, a read and a copy.
        view = memoryview(buffer).cast("B")
        if not _PREADV:  # pragma: no cover - Windows
            data = self.read(len(view))
            view[:len(data)] = data
            return len(data)
        n = max(0, min(len(view), self._size - self._pos))
        if not n:
            return 0
        got = os.preadv(self._fd, [view if n == len(view) else view[:n]], self._start + self._pos)
        self._pos += got
        return got

    def close(self) -> None:
        self._fh.close()


def _member_data_start(path: str, info: zipfile.ZipInfo) -> int | None:
    """Offset of a member's data in the zip file (after its local header), or None."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    if header[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _zip_tail(fh: Any) -> tuple[int, bytes, int]:
    """(file size, the file's last 64 KiB + 22 bytes, index of the end-of-central-directory
    record in them or -1): the record is within that reach (its comment is at most 64 KiB)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    tail_len = min(size, 65536 + 22)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    return size, tail, tail.rfind(b"PK\x05\x06")


def _central_entry_offset(fh: Any, name: bytes) -> int | None:
    """File offset of `name`'s central directory header, or None (zip64 or not found)."""
    _size, tail, end = _zip_tail(fh)
    if end < 0:
        return None
    cd_size, cd_offset = struct.unpack("<II", tail[end + 12:end + 20])
    if cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        return None
    fh.seek(cd_offset)
    directory = fh.read(cd_size)
    pos = 0
    while pos + 46 <= len(directory) and directory[pos:pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", directory[pos + 28:pos + 34])
        if directory[pos + 46:pos + 46 + name_len] == name:
            return cd_offset + pos
        pos += 46 + name_len + extra_len + comment_len
    return None
