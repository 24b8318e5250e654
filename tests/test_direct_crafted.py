"""Crafted files the direct backend must not edit by a mapping it has not proven (issue 14):
links and foreign storage, shared storage, legacy .h5 layer order, zip layouts Keras reads
differently, zip bombs, kernels stored in another dtype than Keras loads them in."""
from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest

from conftest import kprune, write_spec

ONE_LAYER = """\
version: 1
models:
  - path: {model}
    layers:
      - {{name: {layer}, max_fraction: 1.0, rules: [{rules}]}}
"""


def rezip(src: Path, dest: Path, edit: Callable[[h5py.File], None] | None = None,
          extra: list[tuple[zipfile.ZipInfo, bytes]] = (), prefix: bytes = b"") -> None:
    """A copy of the .keras `src` whose weights member `edit` changed (with h5py), with `extra`
    entries appended and `prefix` bytes before the archive."""
    with zipfile.ZipFile(src) as zin:
        weights = io.BytesIO(zin.read("model.weights.h5"))
        if edit is not None:
            with h5py.File(weights, "r+") as f:
                edit(f)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zout:
            for info in zin.infolist():
                data = weights.getvalue() if info.filename == "model.weights.h5" \
                    else zin.read(info)
                zout.writestr(info, data)
            for info, data in extra:
                zout.writestr(info, data)
    dest.write_bytes(prefix + out.getvalue())


def run(folder: Path, model: str, backend: str, layer: str = "conv2d_1",
        rules: str = "{index: [0]}", command: str = "apply") -> Any:
    spec = write_spec(folder, ONE_LAYER.format(model=model, layer=layer, rules=rules),
                      f"{backend}.yaml")
    extra = ["--audit-log", str(folder / f"{backend}.json")] if command == "apply" else []
    return kprune(command, spec, "--backend", backend, *extra, cwd=folder)


def refused(folder: Path, model: str, why: str) -> str:
    return (f"error: {folder / model}: model '{Path(model).stem}': the direct backend cannot "
            f"edit this file: {why}; use --backend auto or --backend keras\n")


# --- 1. links and storage outside the file --------------------------------------------------

KERNEL = "layers/conv2d/vars/0"  # conv2d_1's kernel: the first Conv2D is stored as layers/conv2d


def _soft_link(f: h5py.File) -> None:
    f["stash"] = f[KERNEL][()]
    del f[KERNEL]
    f[KERNEL] = h5py.SoftLink("/stash")


def _external_link(f: h5py.File) -> None:
    del f[KERNEL]
    f[KERNEL] = h5py.ExternalLink("victim.h5", "/kernel")


def _external_dataset(f: h5py.File) -> None:
    shape = f[KERNEL].shape
    del f[KERNEL]
    f.create_dataset(KERNEL, shape, "<f4", external=[("victim.bin", 0, 4 * int(np.prod(shape)))])


def _virtual_dataset(f: h5py.File) -> None:
    shape = f[KERNEL].shape
    del f[KERNEL]
    layout = h5py.VirtualLayout(shape, "<f4")
    layout[...] = h5py.VirtualSource("victim.h5", "/kernel", shape)
    f.create_virtual_dataset(KERNEL, layout)


@pytest.mark.parametrize("craft, why", [
    (_soft_link, f"the weights file has a SoftLink ({KERNEL}), which Keras refuses to load"),
    (_external_link, f"the weights file has a ExternalLink ({KERNEL}), which Keras refuses to "
                     f"load"),
    (_external_dataset, f"dataset {KERNEL} keeps its data in other files (external or virtual "
                        f"storage), which Keras refuses to load"),
    (_virtual_dataset, f"dataset {KERNEL} keeps its data in other files (external or virtual "
                       f"storage), which Keras refuses to load"),
], ids=["soft-link", "external-link", "external-dataset", "virtual-dataset"])
def test_links_and_foreign_storage_are_refused(tmp_path: Path, small_cnn: Path, craft: Any,
                                               why: str) -> None:
    """The direct backend wrote the zeroed filter through these into other files; now it
    refuses them, and under auto the Keras backend refuses them too (its safe loader): the
    model fails, nothing outside the output folder changes."""
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 8)).astype("<f4")
    (tmp_path / "victim.bin").write_bytes(kernel.tobytes())
    with h5py.File(tmp_path / "victim.h5", "w") as f:
        f["kernel"] = kernel
    victims = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rezip(small_cnn, tmp_path / "m.keras", craft)
    victims["m.keras"] = (tmp_path / "m.keras").read_bytes()
    result = run(tmp_path, "m.keras", "direct").expect(1)
    assert result.stderr == refused(tmp_path, "m.keras", why)
    result = run(tmp_path, "m.keras", "auto").expect(1)
    (line,) = result.stderr.splitlines()
    # saving_lib's safe loader raised "Not allowed: H5 file with ..." for conv2d_1; Keras
    # reports it as an object that could not be loaded
    assert line.startswith(f"error: {tmp_path / 'm.keras'}: model 'm': Keras could not load the "
                           f"model (ValueError: "), line
    assert {p: (tmp_path / p).read_bytes() for p in victims} == victims
    assert not list((tmp_path / "pruned").glob("*.keras"))


# --- 2. storage shared by two variables ----------------------------------------------------

BIAS, BETA = "layers/conv2d/vars/1", "layers/batch_normalization/vars/1"  # both shape (8,)


def test_hard_linked_dataset_is_refused(tmp_path: Path, small_cnn: Path) -> None:
    """conv2d_1's bias is a hard link to bn's beta: Keras loads one value into both, so
    zeroing the bias would zero beta too."""
    def craft(f: h5py.File) -> None:
        del f[BIAS]
        f[BIAS] = f[BETA]

    rezip(small_cnn, tmp_path / "m.keras", craft)
    result = run(tmp_path, "m.keras", "direct").expect(1)
    assert result.stderr == refused(
        tmp_path, "m.keras", f"'{BETA}' is one object under 2 names (a hard link): editing it "
                             f"would edit each")


def test_overlapping_dataset_bytes_are_refused(tmp_path: Path, small_cnn: Path) -> None:
    """Two datasets whose layout messages name the same bytes (no link shared): found from
    the extents of every dataset in the file."""
    with zipfile.ZipFile(small_cnn) as zin:
        blob = bytearray(zin.read("model.weights.h5"))
    with h5py.File(io.BytesIO(bytes(blob))) as f:
        bias, beta = f[BIAS].id.get_offset(), f[BETA].id.get_offset()
    # the data address is written once, in the dataset's layout message (HDF5 file format
    # spec, Data Layout Message version 3, contiguous: address then size, 8 bytes each)
    needle = struct.pack("<QQ", beta, 32)
    assert blob.count(needle) == 1
    at = blob.index(needle)
    blob[at:at + 8] = struct.pack("<Q", bias)

    src = tmp_path / "src.keras"
    shutil.copy(small_cnn, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "m.keras", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, bytes(blob) if info.filename == "model.weights.h5"
                          else zin.read(info))
    with h5py.File(io.BytesIO(bytes(blob))) as f:  # the craft holds: beta reads bias's bytes
        assert np.array_equal(f[BETA][()], f[BIAS][()])
    result = run(tmp_path, "m.keras", "direct").expect(1)
    assert result.stderr == refused(
        tmp_path, "m.keras", f"datasets {BETA} and {BIAS} share bytes: editing one would edit "
                             f"both")


# --- 3. legacy .h5: the order Keras assigns the groups in -----------------------------------

@pytest.fixture(scope="module")
def twins_h5(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two parallel Conv2D layers of the same shape (a swap of their groups loads silently)."""
    from conftest import _seeded_weights

    i = keras.Input((6, 6, 3), name="image")
    a = keras.layers.Conv2D(4, 3, name="a")(i)
    b = keras.layers.Conv2D(4, 3, name="b")(i)
    model = keras.Model(i, keras.layers.Add(name="add")([a, b]), name="twins")
    _seeded_weights(model, 7)
    path = tmp_path_factory.mktemp("twins") / "twins.h5"
    model.save(path)
    return path


def test_h5_layer_names_in_keras_order_map_directly(tmp_path: Path, twins_h5: Path) -> None:
    shutil.copy(twins_h5, tmp_path / "twins.h5")
    run(tmp_path, "twins.h5", "direct", layer="a").expect(0)


def test_h5_layer_names_order_differing_from_keras_is_refused(keras: Any, tmp_path: Path,
                                                              twins_h5: Path) -> None:
    """layer_names lists b before a: Keras gives group b's weights to layer a (by position),
    so the direct backend's by-name mapping would read and edit the other layer."""
    shutil.copy(twins_h5, tmp_path / "twins.h5")
    with h5py.File(tmp_path / "twins.h5", "r+") as f:
        names = [n.decode() if isinstance(n, bytes) else n
                 for n in f["model_weights"].attrs["layer_names"]]
        assert names == ["image", "a", "b", "add"]
        f["model_weights"].attrs["layer_names"] = [n.encode() for n in ["image", "b", "a", "add"]]
        group_b = f["model_weights/b/b/kernel"][()]
    loaded = keras.saving.load_model(str(tmp_path / "twins.h5"), compile=False)
    assert np.array_equal(loaded.get_layer("a").kernel.numpy(), group_b)  # what Keras does
    result = run(tmp_path, "twins.h5", "direct", layer="a").expect(1)
    assert result.stderr == refused(tmp_path, "twins.h5", "the file's layer_names order is not "
                                    "the order Keras gives the layers their weights in")
    run(tmp_path, "twins.h5", "auto", layer="a").expect(0)
    log = json.loads((tmp_path / "auto.json").read_text())
    assert log["models"][0]["backend"] == "keras"


def test_functional_layer_order_is_keras_model_layers(keras: Any) -> None:
    """The reproduced map_graph order equals model.layers of a branching model (ResNet50)."""
    from kprune_batch.backends.direct import _functional_layer_order
    from kprune_batch.graph import build_graph

    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=3)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    graph = build_graph(config)
    reloaded = keras.Model.from_config(json.loads(json.dumps(config["config"])))
    order = _functional_layer_order(config, {p: n.sources for p, n in graph.layers.items()})
    assert order == [layer.name for layer in reloaded.layers]


# --- 4. zip layouts Keras reads differently --------------------------------------------------

def test_duplicate_weights_entry_is_refused(tmp_path: Path, small_cnn: Path) -> None:
    """zipfile (so Keras) reads the last of two entries of a name; the direct backend would
    have patched the first."""
    with zipfile.ZipFile(small_cnn) as zin:
        info = zin.getinfo("model.weights.h5")
        data = zin.read(info)
    with pytest.warns(UserWarning, match="Duplicate name"):
        rezip(small_cnn, tmp_path / "m.keras", extra=[(info, data)])
    result = run(tmp_path, "m.keras", "direct").expect(1)
    assert result.stderr == refused(tmp_path, "m.keras",
                                    "the archive has 2 entries named model.weights.h5")


def test_bytes_before_the_archive_are_refused(tmp_path: Path, small_cnn: Path) -> None:
    """A prefix shifts every offset zipfile computes; the CRC patch would land elsewhere."""
    rezip(small_cnn, tmp_path / "m.keras", prefix=b"#!junk\n" * 100)
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        assert zf.testzip() is None  # zipfile (and so Keras) still reads it
    result = run(tmp_path, "m.keras", "direct").expect(1)
    assert result.stderr == refused(
        tmp_path, "m.keras", "the archive has bytes before its first entry (its offsets are "
                             "shifted)")
    run(tmp_path, "m.keras", "auto").expect(0)


# --- 5. zip bombs ----------------------------------------------------------------------------

def _bomb(src: Path, dest: Path, name: str, size: int) -> None:
    """`src` with member `name` replaced by (or added as) `size` bytes, deflated: for
    config.json the real config followed by spaces, still valid JSON."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            if info.filename != name:
                zout.writestr(info, zin.read(info))
        head = zin.read(name) if name in zin.namelist() else b""
        entry = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        entry.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(entry, "w") as out:
            out.write(head)
            block = b" " * (1 << 22)
            for _ in range((size - len(head)) // len(block)):
                out.write(block)


@pytest.mark.parametrize("name, size, why", [
    ("config.json", 300 << 20, "zip member 'config.json' declares {size} MiB, over the "
                               "256.0 MiB kprune reads into memory"),
    ("assets/blob", 8 << 20, "zip member 'assets/blob' declares {size} MiB but stores only "),
], ids=["config-over-the-cap", "member-over-the-ratio"])
@pytest.mark.parametrize("backend", ["direct", "keras"])
def test_zip_bombs_are_refused_by_both_backends(tmp_path: Path, small_cnn: Path, name: str,
                                                size: int, why: str, backend: str) -> None:
    _bomb(small_cnn, tmp_path / "m.keras", name, size)
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        declared = zf.getinfo(name).file_size
    assert (tmp_path / "m.keras").stat().st_size < declared / 100
    result = run(tmp_path, "m.keras", backend).expect(1)
    (line,) = result.stderr.splitlines()
    head = f"error: {tmp_path / 'm.keras'}: model 'm': " + why.format(
        size=f"{declared / (1 << 20):.1f}")
    assert line.startswith(head), line
    assert line.endswith("; kprune does not read such a file"), line


# --- 6. a kernel stored in another dtype than Keras loads it in -----------------------------

def test_float64_kernel_beyond_float32_gives_the_keras_selection(tmp_path: Path,
                                                                small_cnn: Path) -> None:
    """Keras loads a float64 kernel into the float32 variable its dtype policy says (1e300
    becomes inf): the direct backend refuses it, so auto selects exactly as Keras does and
    --backend direct says why in one line; no numpy warning reaches stderr."""
    def craft(f: h5py.File) -> None:
        value = f[KERNEL][()].astype("<f8")
        value[..., 1] = 1e300
        value[0, 0, 0, 2] = -1e300
        value[..., 3] = 1e-3  # representable in both
        del f[KERNEL]
        f[KERNEL] = value

    rezip(small_cnn, tmp_path / "m.keras", craft)
    for rules, code in (("{index: [1, 5]}", 0), ("{index: [5]}, {abs_mean: {below: 0.01}}", 1)):
        outcomes = {}
        for backend in ("keras", "auto"):
            result = run(tmp_path, "m.keras", backend, rules=rules, command="plan").expect(code)
            assert "Warning" not in result.stderr
            outcomes[backend] = (result.stdout, result.stderr)
        assert outcomes["keras"] == outcomes["auto"]
        result = run(tmp_path, "m.keras", "direct", rules=rules, command="plan").expect(1)
        assert result.stderr == refused(tmp_path, "m.keras", "conv2d_1: kernel is stored as "
                                        "float64, Keras loads it into a float32 variable")
    stdout, stderr = outcomes["keras"]  # the threshold rule sees Keras's inf, as Keras does
    assert stderr.startswith("error: model 'm', layer 'conv2d_1': models[0].layers[0].rules[1]: "
                             "filter 1 has NaN or infinite weights (2 filter(s) affected)"), stderr
