"""TFDS builders for the cxrjax datasets: `tfds.builder(name).download_and_prepare()` runs `prepare`.

    import tensorflow_datasets as tfds
from etils import epath
    import cxrjax.data.tfds_builders  # registers the builders below with TFDS
    tfds.builder("cxr_phantom", data_dir=D).download_and_prepare()
    ds = tfds.data_source("cxr_phantom", data_dir=D, split="train")   # random access, numpy, no TensorFlow

    dl = tfds.download.DownloadConfig(manual_dir="/data/CheXpert-v1.0-small")
    tfds.builder("cxr_chexpert", data_dir=D, size=320).download_and_prepare(download_config=dl)

| builder         | `prepare --source` | manual_dir holds                                                      |
|-----------------|--------------------|-----------------------------------------------------------------------|
| `cxr_phantom`   | phantom            | nothing (rendered)                                                    |
| `cxr_chexpert`  | chexpert           | train.csv, valid.csv, CheXpert-v1.0(-small)/...                       |
| `cxr_mimic`     | mimic              | mimic-cxr-2.0.0-{metadata,chexpert,split}.csv(.gz), files/pXX/...    |
| `cxr_nih14`     | nih                | Data_Entry_2017(_v2020).csv, images/ (or images_*/images/)           |
| `cxr_covid`     | covid              | metadata.csv, images/ (ieee8023/covid-chestxray-dataset layout)       |

One writer: a builder does not serialize anything itself. `_download_and_prepare` calls
`cxrjax.prepare.prepare_dataset` (records.py's parallel, resumable writer) into a work folder beside
the dataset, then hands the result to TFDS. The finished folder is

    D/<name>/1.0.0/<name>-<split>.array_record-0000k-of-0000K   records (hard links, no second copy)
    D/<name>/1.0.0/dataset_info.json, features.json             written by TFDS from this builder's info
    D/<name>/1.0.0/cxrjax/                                      the complete `prepare` output:
        table.parquet, pairs/<strategy>.npz, manifest.json, <name>/1.0.0/ (the same records)

so `config.data.dir = D/<name>/1.0.0/cxrjax` trains from it as from any prepared folder.

Names carry a `cxr_` prefix because TFDS's own catalog already has a `chexpert` builder (another
layout): registering a second class of that name would fail as soon as TFDS imports its catalog.
Building reads an interrupted run's work folder (`D/<name>/.1.0.0.cxrjax-work/`) and resumes it.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from cxrjax.data import prepared
from cxrjax.data import records

PREPARED_SUBDIR = "cxrjax"  # the prepare output inside the dataset's version folder
HOMEPAGE = "https://github.com/stanfordmlgroup/MedAug"

# prepare_dataset options a builder forwards (the rest of its keywords go to tfds.core.DatasetBuilder).
PREPARE_OPTIONS = ("size", "fit", "bit_depth", "pixels", "workers", "shard_size", "compress_level", "strategies",
                   "include_self", "patients", "seed", "reports")


def prepared_dir(data_dir, name: str, version: str = records.RECORD_VERSION) -> Path:
    """The `prepare` output of a built dataset (what `config.data.dir` points at)."""
    return Path(data_dir).expanduser() / name / version / PREPARED_SUBDIR


class CxrBuilder(tfds.core.dataset_builder.FileReaderBuilder, skip_registration=True):
    """A cxrjax dataset as a TFDS dataset: features = `records.record_features`, ArrayRecord files.

    Keyword arguments in PREPARE_OPTIONS (size, fit, bit_depth, workers, shard_size, ...) are passed to
    `prepared.prepare_dataset`; they only matter when the dataset is built.
    """

    VERSION = tfds.core.Version(records.RECORD_VERSION)
    RELEASE_NOTES = {records.RECORD_VERSION: "cxrjax records: image (PNG or raw pixels) + canonical metadata."}
    SOURCE = ""  # prepare --source
    DESCRIPTION = ""
    CITATION = ""

    def __init__(self, *, file_format=None, **kwargs):
        options = {k: kwargs.pop(k) for k in PREPARE_OPTIONS if k in kwargs}
        self._prepare_options = {"size": 256, "fit": "pad", "bit_depth": 8, "pixels": "png", **options}
        super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)
        self._original_state.update(options)  # pickling rebuilds the builder from _original_state

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own lookup tests `isinstance(path, importlib_resources.abc.Traversable)`, and
        # importlib_resources is not among its dependencies (ModuleNotFoundError in a plain venv).
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        # A built dataset describes itself (its features.json is what the writer wrote); otherwise the
        # features of the records this builder's options will write.
        if (self.data_path / "features.json").is_file():
            features = tfds.features.FeatureConnector.from_config(os.fspath(self.data_path))
        else:
            o = self._prepare_options
            features = records.record_features(o["bit_depth"], o["pixels"], o["size"])
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"{self.DESCRIPTION}\n\nOne example per image: the image fitted to a square (PNG, or "
                         "raw pixels with pixels='raw') and the cxrjax canonical metadata (image/patient/study "
                         "ids, study order, view, laterality, report, source, 14 CheXpert labels 1/0/-1/NaN). "
                         f"The full table and the MedAug pair groups are in <data_dir>/{self.name}/"
                         f"{self.VERSION}/{PREPARED_SUBDIR}/."),
            features=features,
            homepage=HOMEPAGE,
            citation=self.CITATION,
        )

    def _source_dir(self, dl_manager) -> Path | None:
        """The dataset's own files (TFDS's manual_dir); None for generated data."""
        return Path(dl_manager.manual_dir)

    def _work_dir(self) -> Path:
        """Where `prepare` runs: beside the final folder, so an interrupted build resumes from it
        (TFDS deletes its temporary folder on failure) and hard links into the dataset always work."""
        final = Path(self._original_data_dir())
        return final.parent / f".{final.name}.cxrjax-work"

    def _original_data_dir(self) -> str:
        # During download_and_prepare, self.data_dir is TFDS's temporary folder; this is the final one.
        return tfds.core.utils.file_utils.get_data_dir_and_dataset_dir(
            given_data_dir=self._original_state.get("data_dir"), builder_name=self.name,
            config_name=self.builder_config_name, version=self.version)[1]

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        src = self._source_dir(dl_manager)
        work = self._work_dir()
        manifest = prepared.prepare_dataset(self.SOURCE, work, src=src, name=self.name, progress=True,
                                           **self._prepare_options)
        print(prepared.summary(manifest))  # counts, bad inputs (listed in manifest.json), timings
        target = Path(self.data_dir)
        shard_lengths = manifest["records"]["shard_lengths"]
        split_infos = []
        for split, lengths in shard_lengths.items():
            shards = [Path(f) for f in records.shard_files(work, self.name, split)]
            if len(shards) != len(lengths):
                raise RuntimeError(f"{work}: manifest.json lists {len(lengths)} shards of split {split!r}, "
                                   f"found {len(shards)}; delete {work} and build again")
            for shard in shards:
                _link_or_copy(shard, target / shard.name)
            num_bytes = sum(shard.stat().st_size for shard in shards)
            template = tfds.core.ShardedFileTemplate(
                data_dir=target, template=records.FILENAME_TEMPLATE, dataset_name=self.name, split=split,
                filetype_suffix="array_record")
            split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=num_bytes,
                                                   filename_template=template))
        self.info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD, override=True)
        self.info.set_splits(tfds.core.SplitDict(split_infos))
        os.replace(work, target / PREPARED_SUBDIR)  # TFDS renames `target` to the final folder next


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy (twice the space, same bytes)
        shutil.copy2(src, dst)


class CxrPhantom(CxrBuilder):
    """The built-in synthetic chest X-ray studies (`cxrjax.data.phantom`); options `patients`, `seed`."""

    SOURCE = "phantom"
    DESCRIPTION = ("Synthetic chest radiographs rendered by cxrjax's phantom: persistent per-patient anatomy, "
                   "several studies per patient, frontal and lateral views, study-level findings and reports.")

    def __init__(self, **kwargs):
        kwargs.setdefault("patients", 200)
        super().__init__(**kwargs)

    def _source_dir(self, dl_manager) -> None:
        return None


class CxrChexpert(CxrBuilder):
    SOURCE = "chexpert"
    DESCRIPTION = ("CheXpert (Irvin et al., AAAI 2019): 224,316 chest radiographs of 65,240 patients, "
                   "14 observations labelled from reports (1 / 0 / -1 uncertain / blank).")
    CITATION = ("@inproceedings{irvin2019chexpert, title={CheXpert: A Large Chest Radiograph Dataset with "
                "Uncertainty Labels and Expert Comparison}, author={Irvin, Jeremy and others}, "
                "booktitle={AAAI}, year={2019}}")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Register and download CheXpert (e.g. CheXpert-v1.0-small) from "
        "https://stanfordmlgroup.github.io/competitions/chexpert/ and point manual_dir at the folder holding "
        "train.csv and valid.csv (image paths in the CSVs are resolved against it or its parent).")


class CxrMimic(CxrBuilder):
    SOURCE = "mimic"
    DESCRIPTION = ("MIMIC-CXR-JPG (Johnson et al., 2019): 377,110 JPEG chest radiographs, 227,835 studies, "
                   "65,379 patients, CheXpert labels and free-text reports.")
    CITATION = ("@article{johnson2019mimicjpg, title={MIMIC-CXR-JPG, a large publicly available database of "
                "labeled chest radiographs}, author={Johnson, Alistair E. W. and others}, "
                "journal={arXiv:1901.07042}, year={2019}}")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MIMIC-CXR-JPG from PhysioNet (credentialed access) and point manual_dir at the folder "
        "holding mimic-cxr-2.0.0-metadata.csv(.gz), -chexpert.csv(.gz), -split.csv(.gz) and files/. Reports "
        "(files/pXX/pN/sM.txt from MIMIC-CXR) are read when present.")


class CxrNih14(CxrBuilder):
    SOURCE = "nih"
    DESCRIPTION = ("NIH ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal radiographs of 30,805 patients; "
                   "the 14 NIH labels are mapped to CheXpert's columns.")
    CITATION = ("@inproceedings{wang2017chestxray8, title={ChestX-ray8: Hospital-scale Chest X-ray Database and "
                "Benchmarks}, author={Wang, Xiaosong and others}, booktitle={CVPR}, year={2017}}")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC and point manual_dir at the "
        "folder holding Data_Entry_2017(_v2020).csv and images/ (or the images_NNN/images/ archives, "
        "extracted), plus train_val_list.txt / test_list.txt for the official split.")


class CxrCovid(CxrBuilder):
    SOURCE = "covid"
    DESCRIPTION = ("COVID-19 image data collection (Cohen et al., 2020): chest radiographs with patient "
                   "metadata and clinical notes; a study is a patient + offset; `finding` is kept as "
                   "extra_finding in the table.")
    CITATION = ("@article{cohen2020covid, title={COVID-19 Image Data Collection}, author={Cohen, Joseph Paul "
                "and Morrison, Paul and Dao, Lan}, journal={arXiv:2003.11597}, year={2020}}")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Clone https://github.com/ieee8023/covid-chestxray-dataset and point manual_dir at it (the folder "
        "holding metadata.csv and images/).")


BUILDERS = {cls.name: cls for cls in (CxrPhantom, CxrChexpert, CxrMimic, CxrNih14, CxrCovid)}
