"""Sage-format preference pairs -> a TFDS dataset of array_record files (``psa-jax build-data``).

A Sage split is a folder with ``metadata.jsonl``, one JSON object a line::

    {"chosen": "x_s.jpg", "rejected": "x_u.jpg", "caption": "...", "category": "...",
     "user_data": {"User_ID": "0000001", "Age": ..., ...}}

(image paths relative to the folder; ``category`` optional). ``build_data`` reads either one such
folder or a root whose sub-folders are splits (``train/``, ``test/``) and writes
``OUT/<name>/1.0.0/`` (array_record shards + TFDS metadata + ``build_report.json``), readable with
``tfds.data_source(name, data_dir=OUT)`` and nothing else: no TensorFlow at build or read time.

Images are stored as PNG bytes (see ``_features``), so ``psa_jax.data.loader`` decodes them with
PIL. A record whose JSON, keys or images are bad is a ``BadRecordError`` naming the file and line;
``skip_bad=True`` skips it and counts it in the ``BuildReport`` instead. A split with no records
(an empty ``metadata.jsonl``, or every record skipped) is a ``BadRecordError`` naming its file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from psa_jax.core.errors import PsaJaxError
from psa_jax.data.profiles import format_user_id

METADATA = "metadata.jsonl"
VERSION = "1.0.0"
REPORT = "build_report.json"
_REQUIRED = ("chosen", "rejected", "caption", "user_data")


class BadRecordError(PsaJaxError, ValueError):
    """A ``metadata.jsonl`` record that cannot be built, or a split with no records to build;
    the message names the file (and line) and why."""


class SageSourceError(PsaJaxError, FileNotFoundError):
    """``--source`` is not a Sage split folder nor a root of split folders; names the path."""


@dataclasses.dataclass
class BuildReport:
    num_records: int  # written, all splits
    num_skipped: int
    skipped: list[tuple[int, str]]  # (1-based line, reason naming the metadata file)
    out: str  # the dataset directory, OUT/<name>/<version>
    splits: dict[str, int] = dataclasses.field(default_factory=dict)  # records per split
    # The distinct user ids written per split (sorted): what the trainer needs to know of a
    # split's users without reading every record back.
    users: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Record:
    line: int  # 1-based line in metadata.jsonl; the stored ``index`` is line - 1
    where: str  # "<metadata path> line <n>", for messages
    chosen: str  # absolute image paths
    rejected: str
    caption: str
    user_id: str
    category: str


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` (bilinear) and center-crop a square.

    The same ops, in the same order and rounding, as torchvision's ``Resize(r)`` + ``CenterCrop(r)``
    in PSAlign's / Diffusion-DPO's training transforms, so stored pixels match theirs.
    """
    w, h = image.size
    if min(w, h) != resolution:
        if w <= h:
            size = (resolution, int(resolution * h / w))
        else:
            size = (int(resolution * w / h), resolution)
        image = image.resize(size, Image.BILINEAR)
        w, h = image.size
    top, left = round((h - resolution) / 2.0), round((w - resolution) / 2.0)
    return image.crop((left, top, left + resolution, top + resolution))


def encode_image(path: str, resolution: int | None) -> bytes:
    """Read any PIL-readable file as RGB, optionally fit it to a square, return PNG bytes."""
    with Image.open(path) as im:
        im.load()  # decodes fully now: truncated or garbage files fail here, not at train time
        image = im.convert("RGB")
    if resolution is not None:
        image = fit_square(image, resolution)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast; PNG is lossless at any level
    return buf.getvalue()


def _user_id(user_data: object) -> str:
    if not isinstance(user_data, dict) or "User_ID" not in user_data:
        raise KeyError("user_data.User_ID")
    uid = user_data["User_ID"]
    return format_user_id(uid) if isinstance(uid, int) else str(uid)


def read_metadata(split_dir: str) -> tuple[list[_Record], list[tuple[int, str]]]:
    """Parse ``metadata.jsonl`` into records plus the (line, reason) of every bad line.

    Cheap checks only (JSON, keys, image files exist), so a bad Sage split fails in seconds, before
    any image is decoded; unreadable images are caught while building.
    """
    path = os.path.join(split_dir, METADATA)
    records, bad = [], []
    with open(path, "rb") as f:  # decoded line by line: one bad byte is one bad record
        for line_no, raw in enumerate(f, start=1):
            where = f"{path} line {line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.append((line_no, f"{where}: not UTF-8 text ({err.reason} at byte {err.start})"))
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                bad.append((line_no, f"{where}: malformed JSON ({err.msg})"))
                continue
            if not isinstance(obj, dict):
                bad.append((line_no, f"{where}: not a JSON object"))
                continue
            missing = [k for k in _REQUIRED if k not in obj]
            try:
                user_id = _user_id(obj.get("user_data"))
            except KeyError:
                user_id = None
                missing += [] if "user_data" in missing else ["user_data.User_ID"]
            if missing:
                bad.append((line_no, f"{where}: missing keys {missing}"))
                continue
            images = {k: os.path.join(split_dir, str(obj[k])) for k in ("chosen", "rejected")}
            absent = [f"{k}={p}" for k, p in images.items() if not os.path.isfile(p)]
            if absent:
                bad.append((line_no, f"{where}: image not found: {', '.join(absent)}"))
                continue
            records.append(
                _Record(
                    line_no,
                    where,
                    images["chosen"],
                    images["rejected"],
                    str(obj["caption"]),
                    user_id,
                    str(obj.get("category") or ""),
                )
            )
    return records, bad


def _features() -> tfds.features.FeaturesDict:
    # Images are PNG bytes in a scalar object Tensor, not tfds.features.Image (needs TensorFlow)
    # nor a uint8 Tensor: PNG is lossless (pixels round-trip exactly), smaller than raw
    # pixels, and allows a dataset of mixed sizes when no --resolution is given (a Tensor feature
    # needs one fixed shape). The PIL decode it costs runs in the loader's threads.
    png = tfds.features.Tensor(shape=(), dtype=np.object_, doc="PNG bytes, RGB")
    return tfds.features.FeaturesDict(
        {
            "chosen": png,
            "rejected": png,
            "caption": tfds.features.Text(),
            "user_id": tfds.features.Text(),
            "category": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int64, doc="0-based line in metadata.jsonl"),
        }
    )


class SageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over Sage split folders; built only through ``build_data``.

    Not registered in TFDS's global registry (``skip_registration``): names are chosen per call,
    and reading needs only the files on disk.
    """

    name = "sage"
    VERSION = tfds.core.Version(VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # No checksums file next to this module; TFDS's own lookup also needs the
        # `importlib_resources` backport for a builder inside a package, which we don't depend on.
        return None

    def __init__(
        self,
        *,
        splits: dict[str, tuple[list[_Record], list[tuple[int, str]]]],
        resolution: int | None,
        skip_bad: bool,
        **kwargs,
    ) -> None:
        self._source_splits = splits  # split -> read_metadata() of its folder, checked
        self._resolution = resolution
        self._skip_bad = skip_bad
        self.skipped: list[tuple[int, str]] = []
        self.users: dict[str, set[str]] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Sage-format (chosen, rejected) image pairs per user, PNG-encoded.",
            features=_features(),
            metadata=tfds.core.MetadataDict(resolution=self._resolution),
            disable_shuffling=True,  # storage order = metadata order: deterministic, inspectable
        )

    def _split_generators(self, dl_manager: object) -> dict[str, Iterator]:
        del dl_manager  # everything is local
        generators = {}
        for split, (records, bad) in self._source_splits.items():
            self._fail_or_skip(bad)
            self.users[split] = set()
            generators[split] = self._generate_examples(records, self.users[split])
        return generators

    def _fail_or_skip(self, bad: list[tuple[int, str]]) -> None:
        if bad and not self._skip_bad:
            raise _bad_records_error(bad)
        self.skipped.extend(bad)

    def _generate_examples(
        self, records: list[_Record], users: set[str]
    ) -> Iterator[tuple[int, dict]]:
        yielded, first_skip = 0, ""
        for r in records:
            encoded: dict[str, bytes] = {}
            for key, path in (("chosen", r.chosen), ("rejected", r.rejected)):
                try:
                    encoded[key] = encode_image(path, self._resolution)
                except Exception as err:  # PIL raises OSError, SyntaxError, zlib.error, ...
                    why = f"{r.where}: unreadable {key} image {path}: {type(err).__name__}: {err}"
                    self._fail_or_skip([(r.line, why)])
                    first_skip = first_skip or why
                    break
            if len(encoded) < 2:
                continue
            users.add(r.user_id)
            yield (
                r.line - 1,
                {
                    "chosen": encoded["chosen"],
                    "rejected": encoded["rejected"],
                    "caption": r.caption,
                    "user_id": r.user_id,
                    "category": r.category,
                    "index": r.line - 1,
                },
            )
            yielded += 1
        if records and not yielded:  # else TFDS fails with "No examples were yielded"
            raise BadRecordError(
                f"{_metadata_of(records[0])}: no records left to build: the images of all "
                f"{len(records)} records are unreadable and skipped (first: {first_skip})"
            )


def _metadata_of(record: _Record) -> str:
    return record.where.rsplit(" line ", 1)[0]  # where = "<metadata.jsonl path> line <n>"


def _bad_records_error(bad: list[tuple[int, str]]) -> BadRecordError:
    return BadRecordError(bad[0][1] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


def find_splits(source_dir: str, split: str = "train") -> dict[str, str]:
    """``{split: folder}``: the folder itself if it holds ``metadata.jsonl``, else its sub-folders
    that do (a Sage root with ``train/`` and ``test/``)."""
    if not os.path.isdir(source_dir):
        what = "not a folder" if os.path.exists(source_dir) else "no such folder"
        raise SageSourceError(f"{source_dir}: {what} (expected a Sage folder with {METADATA})")
    if os.path.isfile(os.path.join(source_dir, METADATA)):
        return {split: source_dir}
    subs = sorted(
        d for d in os.listdir(source_dir) if os.path.isfile(os.path.join(source_dir, d, METADATA))
    )
    if not subs:
        raise SageSourceError(f"{source_dir}: no {METADATA} in it nor in any sub-folder")
    return {d: os.path.join(source_dir, d) for d in subs}


def check_metadata(
    split_dir: str, skip_bad: bool = False
) -> tuple[list[_Record], list[tuple[int, str]]]:
    """:func:`read_metadata` of a split folder, failing fast, before anything is written: a bad
    line (unless ``skip_bad``), or no records at all, is a :class:`BadRecordError` naming the
    ``metadata.jsonl`` (TFDS would only say "No examples were yielded")."""
    records, bad = read_metadata(split_dir)
    if bad and not skip_bad:
        raise _bad_records_error(bad)
    if not records:
        path = os.path.join(split_dir, METADATA)
        if not bad:
            raise BadRecordError(f"{path}: no records (the file is empty or only blank lines)")
        raise BadRecordError(
            f"{path}: no records left to build: all {len(bad)} are bad and skipped "
            f"(first: {bad[0][1]})"
        )
    return records, bad


def build_data(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    resolution: int | None = None,
    skip_bad: bool = False,
    name: str = "sage",
    split: str = "train",
) -> BuildReport:
    """Build ``out_dir/<name>/1.0.0`` from a Sage split folder (named ``split``) or a Sage root.

    Builds in a temporary folder inside ``out_dir`` and moves the result into place at the end, so
    a failed build never leaves a half-written dataset nor destroys a previous one.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    if resolution is not None and resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    source_dir, out_dir = os.path.abspath(source_dir), os.path.abspath(out_dir)
    # Every metadata.jsonl is parsed and checked before out_dir is touched: a bad or empty
    # source fails in seconds and leaves nothing behind.
    splits = {
        s: check_metadata(folder, skip_bad) for s, folder in find_splits(source_dir, split).items()
    }
    os.makedirs(out_dir, exist_ok=True)
    cls = SageBuilder
    if name != SageBuilder.name:
        cls = type(f"SageBuilder_{name}", (SageBuilder,), {"name": name}, skip_registration=True)
    final = os.path.join(out_dir, name, VERSION)
    tmp = tempfile.mkdtemp(prefix=f".build-{name}-", dir=out_dir)
    try:
        builder = cls(
            splits=splits,
            resolution=resolution,
            skip_bad=skip_bad,
            data_dir=tmp,
            file_format="array_record",
        )
        # TFDS prints "Downloading and preparing dataset ..." / "... downloaded and prepared to
        # <temporary folder>" to stdout: nothing is downloaded and the folder is moved below,
        # so both lines mislead; the BuildReport says what was built.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_dir=os.path.join(tmp, "downloads"),
                download_config=tfds.download.DownloadConfig(
                    download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
                ),
            )
        counts = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
        report = BuildReport(
            num_records=sum(counts.values()),
            num_skipped=len(builder.skipped),
            skipped=sorted(builder.skipped),
            out=final,
            splits=counts,
            users={k: sorted(v) for k, v in builder.users.items()},
        )
        built = os.fspath(builder.data_path)
        with open(os.path.join(built, REPORT), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(built, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
