"""Image embeddings of a prepared data set -> parquet or npy for notebooks (the library behind
`python -m cxrjax.export`, whose docstring describes the output and the pseudonymisation).

    export_run(...)             encoder (a run's checkpoint, ImageNet weights or random init) + size -> OUT
    export_embeddings(...)      an encoder's embeddings of every image of some splits, streamed to OUT
    pseudonym / resolve_salt    salted HMAC ids, and where the salt is kept
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data import schema

ID_COLUMNS = ("patient_id", "study_id", "image_id")  # pseudonymised unless --raw_ids
METADATA = ("image_id", "patient_id", "study_id", "study_order", "view", "laterality", "split", "source",
            *schema.CHEXPERT_LABELS)


def pseudonym(values: pd.Series, salt: str) -> pd.Series:
    """HMAC-SHA256(salt, id) -> 16 hex digits; the same id and salt give the same pseudonym."""
    key = salt.encode()
    return values.astype(str).map(lambda v: hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:16])


def salt_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out / "salt.txt" if out.suffix == "" else out.with_name(out.name + ".salt.txt")


def resolve_salt(out: str | os.PathLike, salt: str = "") -> str:
    """--salt, else the salt of an earlier export beside OUT, else a new random one saved there (0600)."""
    if salt:
        return salt
    path = salt_path(out)
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
    return new


def metadata_frame(table: pd.DataFrame, rows: np.ndarray, *, raw_ids: bool, salt: str) -> pd.DataFrame:
    cols = [c for c in METADATA if c in table.columns] + (["path"] if raw_ids else [])
    meta = table.iloc[rows][cols].reset_index(drop=True)
    if not raw_ids:
        for c in ID_COLUMNS:
            meta[c] = pseudonym(meta[c], salt)
    meta.insert(0, "row", rows.astype(np.int64))
    return meta


def read_rows(path: str | os.PathLike, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-D .npy file by plain reads (no memory map: nothing stays resident)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-ordered 2-D array, got shape {shape}")
        f.seek(f.tell() + start * shape[1] * dtype.itemsize)
        return np.fromfile(f, dtype, count=(stop - start) * shape[1]).reshape(-1, shape[1])


def export_embeddings(encoder, data_dir: str, out: str, *, mesh, augment, splits=("train", "valid", "test"),
                      fmt: str = "parquet", output: str = "backbone", raw_ids: bool = False, salt: str = "",
                      batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                      chunk_rows: int = 16384) -> pd.DataFrame:
    """Embeddings of every image of `splits` (those present) -> OUT; returns the metadata frame written.

    Streams: each split's embeddings go to a temporary .npy beside OUT as they are computed, then into the
    output `chunk_rows` rows at a time (parquet row groups, or one embeddings.npy), so memory does not grow
    with the number of images (only the metadata table does).
    """
    import jax
    import pyarrow as pa

    from cxrjax.eval import features

    if fmt not in ("parquet", "npy"):
        raise ValueError(f"format {fmt!r}; expected 'parquet' or 'npy'")
    import pyarrow.parquet as pq

    table_path = Path(data_dir) / "table.parquet"
    names = set(pq.read_schema(table_path).names)  # only the columns written (not the reports: they can be large)
    table = pd.read_parquet(table_path, columns=[c for c in (*METADATA, "path") if c in names])
    present = [s for s in splits if (table["split"] == s).any()]
    if not present:
        raise ValueError(f"{data_dir}/table.parquet has none of the splits {list(splits)} "
                         f"(it has {sorted(table['split'].unique())})")
    salt = "" if raw_ids else resolve_salt(out, salt)
    out = Path(out)
    (out if fmt == "npy" else out.parent).mkdir(parents=True, exist_ok=True)
    tmp = {s: (out / f".{s}.embeddings.npy" if fmt == "npy" else out.with_name(f".{out.name}.{s}.embeddings.npy"))
           for s in present}
    leader = jax.process_index() == 0
    try:
        rows, dim = [], None
        for split in present:
            x, r = features.extract_features(encoder, data_dir, split, augment, mesh=mesh, batch_size=batch_size,
                                             output=output, num_workers=num_workers, progress=progress,
                                             out=tmp[split])
            rows.append(r)
            dim = int(x.shape[1])
            del x  # a memory map of the temporary file; the rows are read back in chunks below
        rows = np.concatenate(rows)
        meta = metadata_frame(table, rows, raw_ids=raw_ids, salt=salt)
        if not leader:
            return meta
        provenance = {"encoder": json.dumps(encoder.source), "data": str(Path(data_dir).resolve()), "output": output,
                      "size": str(augment.size), "pseudonymised": str(not raw_ids)}
        chunks = [(split, a, min(a + chunk_rows, n))
                  for split, n in ((s, int((table["split"] == s).sum())) for s in present)
                  for a in range(0, n, chunk_rows)]
        if fmt == "npy":
            _write_npy_chunks(out / "embeddings.npy", len(rows), dim, ((tmp[s], a, b) for s, a, b in chunks))
            t = pa.Table.from_pandas(meta, preserve_index=False)
            pq.write_table(t.replace_schema_metadata({**(t.schema.metadata or {}), **provenance}),
                           out / "metadata.parquet")
        else:
            part = out.with_name(out.name + ".tmp")
            meta_schema = pa.Schema.from_pandas(meta, preserve_index=False)  # one schema for every row group
            schema = meta_schema.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
            schema = schema.with_metadata({**(meta_schema.metadata or {}), **provenance})
            start = 0
            with pq.ParquetWriter(part, schema) as writer:
                for split, a, b in chunks:
                    t = pa.Table.from_pandas(meta.iloc[start:start + b - a], schema=meta_schema, preserve_index=False)
                    start += b - a
                    emb = pa.FixedSizeListArray.from_arrays(pa.array(read_rows(tmp[split], a, b).reshape(-1),
                                                                     pa.float32()), dim)
                    writer.write_table(pa.Table.from_arrays([*t.columns, emb], schema=schema), row_group_size=b - a)
            os.replace(part, out)  # atomic: a killed export never leaves half a file under the final name
        return meta
    finally:
        for f in tmp.values():
            f.unlink(missing_ok=True)
            f.with_name(f.name + ".tmp").unlink(missing_ok=True)


def _write_npy_chunks(path: Path, n: int, dim: int, blocks) -> None:
    """One (n, dim) float32 .npy from (file, start, stop) row blocks, in order, without holding it in memory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for src, a, b in blocks:
            f.write(np.ascontiguousarray(read_rows(src, a, b), "<f4").tobytes())
    os.replace(tmp, path)


def export_run(data: str, out: str, *, checkpoint: str = "", init: str = "checkpoint", weights: str = "",
               arch: str = "resnet18", width: int = 64, seed: int = 0, size: int = 0, eval_crop: float = 1.0,
               splits=("train", "valid", "test"), fmt: str = "parquet", output: str = "backbone",
               raw_ids: bool = False, salt: str = "", batch_size: int = 64, num_workers: int = 0) -> pd.DataFrame:
    """The export command: the encoder (`checkpoint` of a MoCo or MVLM run, or `init` imagenet / random of
    `arch`), its image size (a ViT's own; a ResNet's from the run's config.json unless `size`), then
    `export_embeddings` on a data-parallel mesh of every device. Mistakes raise ValueError / FileNotFoundError."""
    import jax

    from cxrjax.data import augment as augment_lib
    from cxrjax.eval import features
    from cxrjax.train import contrastive

    if not (Path(data) / "table.parquet").is_file():
        raise FileNotFoundError(f"--data={data} holds no table.parquet; prepare it with python -m cxrjax.prepare --out={data}")
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    if init == "checkpoint":
        if not checkpoint:
            raise ValueError("--checkpoint=WORKDIR[/STEP] is required (or --init=random / imagenet)")
        encoder = features.restore_encoder(checkpoint, mesh)
    else:
        model = contrastive.default_config().model
        model.update(arch=arch, width=width)
        encoder = features.build_encoder(model, init, weights=weights, seed=seed, mesh=mesh)
    if encoder.kind == "vit":  # a ViT takes the size it was trained at (fixed patch grid)
        if size not in (0, encoder.source["image_size"]):
            raise ValueError(f"the ViT of {checkpoint} takes {encoder.source['image_size']} px images, "
                             f"not --size={size}; leave --size out")
        size = encoder.source["image_size"]
    elif size <= 0:
        saved = Path(encoder.source.get("checkpoint", "")) / "config.json"
        if not saved.is_file():
            raise ValueError("--size is required: the run has no config.json with its training size")
        size = int(json.loads(saved.read_text())["augment"]["size"])
    aug = augment_lib.AugmentConfig(size=size, eval_crop=eval_crop)
    return export_embeddings(encoder, data, out, mesh=mesh, augment=aug, splits=tuple(splits), fmt=fmt, output=output,
                             raw_ids=raw_ids, salt=salt, batch_size=batch_size, num_workers=num_workers)
