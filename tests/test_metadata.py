"""Dataset adapters -> canonical table: fixtures in each dataset's exact file format, plus real data."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrjax.data import metadata as M
from cxrjax.data.schema import CHEXPERT_LABELS, COLUMNS, MetadataError, hash_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not available")
nan = np.nan


def labels(row: pd.Series) -> dict:
    return {c: row[c] for c in CHEXPERT_LABELS if not np.isnan(row[c])}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ views
def test_normalize_view():
    raw = pd.Series(["PA", "ap", "AP Supine", "AP_SUPINE", "aps", "L", "LL", "RL", "LATERAL", "Lateral",
                     "Frontal", "", "?", None, nan, "AP AXIAL", " pa "])
    assert M.normalize_view(raw).tolist() == [
        "PA", "AP", "AP_SUPINE", "AP_SUPINE", "AP_SUPINE", "LATERAL", "LATERAL", "LATERAL", "LATERAL", "LATERAL",
        "FRONTAL", "UNKNOWN", "UNKNOWN", "UNKNOWN", "UNKNOWN", "UNKNOWN", "PA"]


# --------------------------------------------------------------------------------------- CheXpert
CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)


def chexpert_row(path, fl="Frontal", appa="AP", **labs):
    vals = [labs.get(c.replace(" ", "_"), "") for c in CHEXPERT_LABELS]
    return ",".join([path, "Female", "68", fl, appa] + vals)


def chexpert_train(folder: Path) -> Path:
    p = "CheXpert-v1.0-small/train/"
    rows = [
        chexpert_row(p + "patient00001/study1/view1_frontal.jpg", No_Finding="1.0", Pneumothorax="0.0", Support_Devices="1.0"),
        chexpert_row(p + "patient00002/study2/view1_frontal.jpg", Cardiomegaly="-1.0", Lung_Opacity="1.0"),
        chexpert_row(p + "patient00002/study1/view1_frontal.jpg", appa="PA", Edema="-1.0"),
        chexpert_row(p + "patient00002/study1/view2_lateral.jpg", fl="Lateral", appa=""),
        chexpert_row(p + "patient00002/study10/view1_frontal.jpg", appa=""),  # Frontal, blank AP/PA
        chexpert_row(p + "patient00002/study9/view1_frontal.jpg", Cardiomegaly="2.0", Edema="1.0"),  # bad label
        chexpert_row(p + "study3/view1_frontal.jpg"),  # no patient folder
        chexpert_row(p + "patient00003/study1/view1_frontal.jpg", fl="Frontal", appa="LL", Fracture="x"),
    ]
    return write(folder / "train.csv", "\n".join([CHEXPERT_HEADER] + rows) + "\n")


def test_chexpert_csv(tmp_path):
    r = M.load_chexpert_csv(chexpert_train(tmp_path / "CheXpert-v1.0-small"), split="train")
    t = r.table.set_index("image_id")
    assert list(r.table.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(t) == 7 and r.root == tmp_path
    row = t.loc["patient00001/study1/view1_frontal"]
    assert row["path"] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert (row["patient_id"], row["study_id"], row["view"], row["laterality"]) == (
        "patient00001", "patient00001/study1", "AP", "frontal")
    assert labels(row) == {"No Finding": 1.0, "Pneumothorax": 0.0, "Support Devices": 1.0}
    assert t["Cardiomegaly"].dtype == np.float32
    # integer study numbers: study1 < study2 < study9 < study10 (MedAug kept only the last digit)
    p2 = t[t["patient_id"] == "patient00002"]
    assert dict(zip(p2["study_id"], p2["study_order"])) == {
        "patient00002/study1": 0, "patient00002/study2": 1, "patient00002/study9": 2, "patient00002/study10": 3}
    assert t.loc["patient00002/study10/view1_frontal", "view"] == "FRONTAL"
    assert t.loc["patient00002/study1/view1_frontal", "view"] == "PA"
    assert t.loc["patient00002/study1/view2_lateral", ["view", "laterality"]].tolist() == ["LATERAL", "lateral"]
    assert t.loc["patient00003/study1/view1_frontal", "view"] == "FRONTAL"  # Frontal wins over 'LL'
    assert labels(t.loc["patient00002/study2/view1_frontal"]) == {"Cardiomegaly": -1.0, "Lung Opacity": 1.0}
    assert labels(t.loc["patient00002/study9/view1_frontal"]) == {"Edema": 1.0}  # 2.0 blanked, row kept
    assert t["split"].eq("train").all() and t["source"].eq("chexpert").all() and t["report"].eq("").all()
    assert [b["path"] for b in r.bad] == ["train.csv:7", "train.csv:8", "train.csv:9"]
    assert "'Cardiomegaly'=2.0" in r.bad[0]["reason"] and "blanked" in r.bad[0]["reason"]
    assert "study3/view1_frontal.jpg" in r.bad[1]["reason"] and "dropped" in r.bad[1]["reason"]
    assert "'Fracture'=x" in r.bad[2]["reason"]


def test_chexpert_hash_split_and_folder(tmp_path):
    folder = tmp_path / "CheXpert-v1.0-small"
    chexpert_train(folder)
    valid = chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", Edema="0.0")
    with gzip.open(folder / "valid.csv.gz", "wt") as f:
        f.write(CHEXPERT_HEADER + "\n" + valid + "\n")
    r = M.load_chexpert_csv(folder / "train.csv")  # split None -> patient hash
    expect = hash_split(r.table["patient_id"])
    assert r.table["split"].tolist() == expect.tolist()
    for src in (folder, tmp_path):  # the folder itself or its parent
        r = M.load_chexpert(src)
        t = r.table.set_index("image_id")
        assert len(t) == 8 and r.root == tmp_path
        assert t.loc["patient64541/study1/view1_frontal", "split"] == "test"
        assert t.loc["patient64541/study1/view1_frontal", "path"].startswith("CheXpert-v1.0-small/valid/")
        assert set(t["split"]) <= {"train", "valid", "test"}
        assert len(r.bad) == 3


def test_chexpert_wrong_dir(tmp_path):
    write(tmp_path / "labels.csv", "a,b\n1,2\n")
    with pytest.raises(MetadataError, match=r"train\.csv.*valid\.csv.*" + str(tmp_path.name)):
        M.load_chexpert(tmp_path)
    with pytest.raises(MetadataError, match=r"missing column\(s\).*Path"):
        M.load_chexpert_csv(tmp_path / "labels.csv")
    with pytest.raises(MetadataError, match="not a directory"):
        M.load_chexpert(tmp_path / "nope")


# ----------------------------------------------------------------------------------------- MIMIC
MIMIC_META = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,"
    "ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning\n"
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect\n"
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect\n"
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PA AND LAT),PA,3056,2544,21800626,165500.312,CHEST (PA AND LAT),postero-anterior,Erect\n"
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,10000032,53911762,CHEST (PORTABLE AP),AP,2705,2539,21800723,80905.796,CHEST (PORTABLE AP),antero-posterior,Erect\n"
    "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818,10000764,57375967,CHEST (PA AND LAT),AP,2544,3056,21321015,24930.016,CHEST (PA AND LAT),antero-posterior,Erect\n"
    "ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c,,57375967,CHEST (PA AND LAT),AP,2544,3056,21321015,24930.016,CHEST (PA AND LAT),antero-posterior,Erect\n"
)
MIMIC_CHEXPERT = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
    "10000032,50414267,,,,,,,,,1.0,,,,,\n"
    "10000032,53189527,,,,,,,,,1.0,,,,,\n"
    "10000032,53911762,,,,,,,,,1.0,,,,,\n"
    "10000764,57375967,,,1.0,,,,,,,,,-1.0,,3\n"
)
MIMIC_SPLIT = (
    "dicom_id,study_id,subject_id,split\n"
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train\n"
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train\n"
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527,10000032,train\n"
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,53911762,10000032,train\n"
    "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818,57375967,10000764,validate\n"
)


def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    root.mkdir()
    for name, text in (("metadata", MIMIC_META), ("chexpert", MIMIC_CHEXPERT), ("split", MIMIC_SPLIT)):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt") as f:
            f.write(text)
    write(root / "files/p10/p10000032/s50414267.txt", "\n  FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n No acute process.\n")
    return root


def test_mimic(tmp_path):
    r = M.load_mimic(mimic_root(tmp_path))
    t = r.table.set_index("image_id")
    assert len(t) == 5
    row = t.loc["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert row["path"] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert (row["patient_id"], row["study_id"], row["view"], row["split"]) == ("p10000032", "p10000032/s50414267", "PA", "train")
    assert row["report"] == "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n No acute process."
    assert labels(row) == {"No Finding": 1.0}
    p32 = t[t["patient_id"] == "p10000032"]
    assert dict(zip(p32["study_id"], p32["study_order"])) == {
        "p10000032/s50414267": 0, "p10000032/s53189527": 1, "p10000032/s53911762": 2}
    assert t.loc["174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "view"] == "LATERAL"
    assert t.loc["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "report"] == ""  # no .txt for that study
    other = t.loc["fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818"]
    assert other["split"] == "valid" and other["study_order"] == 0
    assert labels(other) == {"Consolidation": 1.0, "Pneumonia": -1.0}  # Support Devices=3 blanked
    assert t["source"].eq("mimic-cxr").all()
    assert r.bad == [
        {"path": "mimic-cxr-2.0.0-metadata.csv.gz:7", "reason": "blank subject_id; row dropped"},
        {"path": "mimic-cxr-2.0.0-chexpert.csv.gz:5",
         "reason": "label 'Support Devices'=3.0 is not 1, 0, -1 or blank; label blanked"},
    ]
    dcm = M.load_mimic(tmp_path / "mimic-cxr-jpg", image_ext=".dcm", reports=False)
    assert dcm.table["path"].str.endswith(".dcm").all() and dcm.table["report"].eq("").all()


def test_mimic_wrong_dir(tmp_path):
    with pytest.raises(MetadataError, match="mimic-cxr-2.0.0-metadata.csv"):
        M.load_mimic(tmp_path)


# ------------------------------------------------------------------------------------------- NIH
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.14300000000000002,0.14300000000000002",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.14300000000000002,0.14300000000000002",
    "00000003_002.png,Effusion|Mass,2,3,75,F,AP,2048,2500,0.168,0.168",
    "00000003_010.png,No Finding,10,3,76,F,PA,2992,2991,0.143,0.143",
    "00000005_000.png,Hernia,0,,60,F,PA,2048,2500,0.168,0.168",
    "00000006_000.png,Infiltration|Nodule|Pleural_Thickening|Foo,0,6,81,M,AP,2500,2048,0.168,0.168",
]


def nih_root(tmp_path: Path, official_layout=False) -> Path:
    root = tmp_path / "nih"
    write(root / "Data_Entry_2017_v2020.csv", "\n".join([NIH_HEADER] + NIH_ROWS) + "\n")
    if official_layout:
        for sub, names in (("images_001", ["00000001_000.png", "00000001_001.png"]), ("images_002", ["00000003_002.png"])):
            (root / sub / "images").mkdir(parents=True)
            for n in names:
                (root / sub / "images" / n).write_bytes(b"")
    return root


def test_nih(tmp_path):
    r = M.load_nih(nih_root(tmp_path))
    t = r.table.set_index("image_id")
    assert sorted(t.index) == ["00000001_000", "00000001_001", "00000003_002", "00000003_010", "00000006_000"]
    row = t.loc["00000003_002"]
    assert (row["path"], row["patient_id"], row["study_id"], row["study_order"], row["view"]) == (
        "images/00000003_002.png", "3", "3/f2", 0, "AP")
    assert t.loc["00000003_010", ["study_id", "study_order"]].tolist() == ["3/f10", 1]
    assert t.loc["00000001_001", "study_order"] == 1
    mapped = ["No Finding", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
              "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other"]
    expect = {c: 0.0 for c in mapped}
    assert labels(row) == {**expect, "Pleural Effusion": 1.0, "Lung Lesion": 1.0}
    assert labels(t.loc["00000003_010"]) == {**expect, "No Finding": 1.0}
    assert labels(t.loc["00000001_001"]) == {**expect, "Cardiomegaly": 1.0}
    assert labels(t.loc["00000006_000"]) == {**expect, "Lung Opacity": 1.0, "Lung Lesion": 1.0, "Pleural Other": 1.0}
    for c in ("Enlarged Cardiomediastinum", "Fracture", "Support Devices"):
        assert t[c].isna().all()
    assert t.loc["00000001_001", "extra_finding_labels"] == "Cardiomegaly|Emphysema"
    assert r.bad == [
        {"path": "Data_Entry_2017_v2020.csv:6", "reason": "blank Patient ID; row dropped"},
        {"path": "Data_Entry_2017_v2020.csv:7", "reason": "unknown NIH label(s) Foo; ignored"},
    ]
    assert set(t["split"]) <= {"train", "valid", "test"} and t["source"].eq("nih-cxr14").all()


def test_nih_official_lists_and_layout(tmp_path):
    root = nih_root(tmp_path, official_layout=True)
    write(root / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n00000006_000.png\n")
    write(root / "test_list.txt", "00000003_002.png\n00000003_010.png\n")
    t = M.load_nih(root).table.set_index("image_id")
    assert t.loc["00000001_001", "path"] == "images_001/images/00000001_001.png"
    assert t.loc["00000003_002", "path"] == "images_002/images/00000003_002.png"
    assert t.loc["00000003_010", "path"] == "images/00000003_010.png"  # not found: flat default
    assert t.loc[["00000003_002", "00000003_010"], "split"].tolist() == ["test", "test"]
    assert set(t.loc[["00000001_000", "00000006_000"], "split"]) <= {"train", "valid"}


def test_nih_wrong_dir(tmp_path):
    with pytest.raises(MetadataError, match="Data_Entry_2017"):
        M.load_nih(tmp_path)


# ----------------------------------------------------------------------------------------- COVID
COVID_HEADER = (
    "patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,needed_supplemental_O2,"
    "extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,lymphocyte_count,view,modality,date,"
    "location,folder,filename,doi,url,license,clinical_notes,other_notes,Unnamed: 28"
)


def covid_row(pid, offset, finding, view, filename, modality="X-ray", notes=""):
    cells = [pid, offset, "M", "54.0", finding] + [""] * 12 + [view, modality, "2020", "", "images", filename,
                                                               "", "", "CC BY", notes, "", ""]
    return ",".join(cells)


def covid_root(tmp_path: Path) -> Path:
    root = tmp_path / "covid-chestxray"
    rows = [
        covid_row("5", "", "ARDS", "PA", "ARDSSevere.png", notes="Severe ARDS."),
        covid_row("17", "9", "COVID-19", "AP", "b.jpg", notes='"Small consolidation, right."'),
        covid_row("17", "3", "COVID-19", "AP Supine", "a.jpg"),
        covid_row("17", "9", "COVID-19", "L", "b-lat.jpg"),
        covid_row("20", "0", "COVID-19", "Axial", "ct.jpg", modality="CT"),
        covid_row("331a", "?", "No Finding", "?", "n.png"),
        covid_row("40", "-5", "todo", "", "t.png"),
        covid_row("41", "2", "Mycoplasma Bacterial Pneumonia", "PA", "m.png"),
        covid_row("", "2", "COVID-19", "PA", "nopid.png"),
    ]
    write(root / "metadata.csv", "\n".join([COVID_HEADER] + rows) + "\n")
    return root


def test_covid(tmp_path):
    r = M.load_covid(covid_root(tmp_path))
    t = r.table.set_index("image_id")
    assert sorted(t.index) == ["ARDSSevere.png", "a.jpg", "b-lat.jpg", "b.jpg", "m.png", "n.png", "t.png"]
    assert t.loc["ARDSSevere.png", ["path", "patient_id", "study_id", "study_order"]].tolist() == [
        "images/ARDSSevere.png", "5", "5/img-ARDSSevere.png", -1]
    assert t.loc[["a.jpg", "b.jpg", "b-lat.jpg"], "study_id"].tolist() == ["17/o3", "17/o9", "17/o9"]
    assert t.loc[["a.jpg", "b.jpg", "b-lat.jpg"], "study_order"].tolist() == [0, 1, 1]
    assert t.loc[["a.jpg", "b.jpg", "b-lat.jpg", "n.png", "t.png"], "view"].tolist() == [
        "AP_SUPINE", "AP", "LATERAL", "UNKNOWN", "UNKNOWN"]
    assert t.loc["n.png", ["study_id", "study_order"]].tolist() == ["331a/img-n.png", -1]  # offset '?'
    assert t.loc["t.png", ["study_id", "study_order"]].tolist() == ["40/o-5", 0]
    assert labels(t.loc["b.jpg"]) == {"No Finding": 0.0, "Pneumonia": 1.0}
    assert labels(t.loc["m.png"]) == {"No Finding": 0.0, "Pneumonia": 1.0}
    assert labels(t.loc["n.png"]) == {"No Finding": 1.0, "Pneumonia": 0.0}
    assert labels(t.loc["t.png"]) == {} and labels(t.loc["ARDSSevere.png"]) == {}
    assert t.loc["t.png", "extra_finding"] == "todo"
    assert t.loc["b.jpg", "report"] == "Small consolidation, right." and t.loc["a.jpg", "report"] == ""
    assert t.loc["b.jpg", "split"] == t.loc["a.jpg", "split"]
    assert r.bad == [
        {"path": "metadata.csv:6", "reason": "modality CT is not X-ray; row dropped"},
        {"path": "metadata.csv:10", "reason": "blank patientid; row dropped"},
    ]


def test_covid_wrong_dir(tmp_path):
    write(tmp_path / "images" / "x.png", "")
    with pytest.raises(MetadataError, match=r"no metadata\.csv in .*covid-chestxray-dataset folder"):
        M.load_covid(tmp_path)


def test_shared_layout(tmp_path):
    root = tmp_path / "shared"
    covid_root(root)
    nih_root(root).rename(root / "nih1000")
    r = M.load_shared(root)
    t = r.table.set_index("image_id")
    assert len(t) == 12 and r.root == root
    assert t.loc["covid:a.jpg", ["path", "patient_id", "study_id"]].tolist() == [
        "covid-chestxray/images/a.jpg", "covid:17", "covid:17/o3"]
    assert t.loc["nih:00000003_002", ["path", "patient_id", "study_id"]].tolist() == [
        "nih1000/images/00000003_002.png", "nih:3", "nih:3/f2"]
    assert t.loc["nih:00000001_000", "extra_finding"] == "" and t.loc["covid:a.jpg", "extra_finding_labels"] == ""
    assert {b["path"] for b in r.bad} == {"covid-chestxray/metadata.csv:6", "covid-chestxray/metadata.csv:10",
                                          "nih1000/Data_Entry_2017_v2020.csv:6", "nih1000/Data_Entry_2017_v2020.csv:7"}
    with pytest.raises(MetadataError, match="nih1000"):
        M.load_shared(tmp_path / "shared" / "covid-chestxray")


# ---------------------------------------------------------------------------------------- OpenI
OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <pmcId id="{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">Normal chest x-XXXX.</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      <major>normal</major>
      {extra_mesh}
   </MeSH>
   <parentImage id="CXR{n}_1_IM-0001-3001"><figureId>F1</figureId></parentImage>
   <parentImage id="CXR{n}_1_IM-0001-4001"><figureId>F2</figureId></parentImage>
</eCitation>
"""


def test_openi_reports(tmp_path):
    docs = {
        "ecgen-radiology/10.xml": OPENI_XML.format(n=10, findings="", extra_mesh="<major>Cardiomegaly/mild</major>"),
        "ecgen-radiology/2.xml": OPENI_XML.format(n=2, findings="The heart is normal.\n   No edema.", extra_mesh=""),
        "ecgen-radiology/3.xml": "<eCitation><unclosed>",
    }
    tgz = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("ecgen-radiology"))
        for name, text in docs.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    df = M.load_openi_reports(tgz)
    assert list(df.columns) == ["report_id", "indication", "comparison", "findings", "impression", "report",
                                "image_ids", "mesh"]
    assert df["report_id"].tolist() == ["CXR2", "CXR10"]  # numeric order
    first = df.iloc[0]
    assert first["findings"] == "The heart is normal. No edema."
    assert first["report"] == "The heart is normal. No edema. Normal chest x-XXXX."
    assert (first["indication"], first["comparison"], first["impression"]) == ("Positive TB test", "None.", "Normal chest x-XXXX.")
    assert first["image_ids"] == ["CXR2_1_IM-0001-3001", "CXR2_1_IM-0001-4001"]
    assert df.iloc[1]["report"] == "Normal chest x-XXXX." and df.iloc[1]["mesh"] == ["normal", "Cardiomegaly/mild"]
    assert [b["path"] for b in df.attrs["bad"]] == ["ecgen-radiology/3.xml"]
    with pytest.raises(MetadataError, match="NLMCXR_reports.tgz"):
        M.load_openi_reports(tmp_path / "missing.tgz")


# ------------------------------------------------------------------------------------ generic CSV
def test_parse_mapping():
    assert M.parse_mapping("path=File, patient_id=PID,view=View,Pleural Effusion=Effusion") == {
        "path": "File", "patient_id": "PID", "view": "View", "Pleural Effusion": "Effusion"}
    with pytest.raises(MetadataError, match="canonical_name=csv_column"):
        M.parse_mapping("path=File,patient_id")


def test_csv(tmp_path):
    csv = write(tmp_path / "mine.csv", (
        "File,PID,Exam,When,View,Set,Effusion,Text\n"
        "a/1.png,P1,E1,2020-01-05,pa,train,1,first\n"
        "a/2.png,P1,E1,2020-01-05,Lateral,,0,\n"
        "a/3.png,P1,E2,2019-12-30,AP,train,-1,\n"
        "b/1.png,,E1,2020-01-01,PA,test,1,\n"
        "c/1.png,P3,E1,2020-01-01,PA,,7,\n"
    ))
    r = M.load_source("csv", csv, mapping="path=File,patient_id=PID,study_id=Exam,study_order=When,view=View,"
                                          "split=Set,Pleural Effusion=Effusion,report=Text", source="mine")
    t = r.table.set_index("image_id")
    assert sorted(t.index) == ["a/1.png", "a/2.png", "a/3.png", "c/1.png"]
    assert t.loc[["a/1.png", "a/2.png", "a/3.png"], "study_id"].tolist() == ["P1/E1", "P1/E1", "P1/E2"]
    assert t.loc[["a/1.png", "a/2.png", "a/3.png"], "study_order"].tolist() == [1, 1, 0]
    assert t.loc[["a/1.png", "a/2.png", "a/3.png"], "view"].tolist() == ["PA", "LATERAL", "AP"]
    assert t.loc[["a/1.png", "a/2.png", "a/3.png"], "split"].tolist() == ["train"] * 3  # blank -> patient's split
    assert t.loc["c/1.png", "split"] == hash_split(pd.Series(["P3"]))[0]
    assert t["Pleural Effusion"].tolist()[:3] == [1.0, 0.0, -1.0] and np.isnan(t.loc["c/1.png", "Pleural Effusion"])
    assert t.loc["a/1.png", "report"] == "first" and t["source"].eq("mine").all()
    assert r.bad == [
        {"path": "mine.csv:5", "reason": "blank patient_id; row dropped"},
        {"path": "mine.csv:6", "reason": "label 'Effusion'=7 is not 1, 0, -1 or blank; label blanked"},
    ]
    # defaults: image_id = path, one study per image
    t2 = M.load_csv(csv, {"path": "File", "patient_id": "PID"}).table.set_index("image_id")
    assert t2.loc["a/2.png", "study_id"] == "P1/img-a/2.png" and (t2["study_order"] == -1).all()


def test_csv_patient_leak_is_refused(tmp_path):
    csv = write(tmp_path / "leak.csv", "File,PID,Set\nx1.png,P7,train\nx2.png,P7,test\nx3.png,P8,valid\n")
    with pytest.raises(MetadataError, match=r"more than one split \(P7\)"):
        M.load_csv(csv, {"path": "File", "patient_id": "PID", "split": "Set"})


def test_csv_bad_mapping(tmp_path):
    csv = write(tmp_path / "x.csv", "File,PID\na.png,1\n")
    with pytest.raises(MetadataError, match="'patient_id'"):
        M.load_csv(csv, {"path": "File"})
    with pytest.raises(MetadataError, match=r"missing column\(s\) \['Who'\]"):
        M.load_csv(csv, {"path": "File", "patient_id": "Who"})
    with pytest.raises(MetadataError, match="not canonical columns"):
        M.load_csv(csv, {"path": "File", "patient_id": "PID", "labelz": "x"})


def test_registry():
    assert set(M.ADAPTERS) == {"chexpert", "mimic", "nih", "shared", "covid", "dicom", "csv"}
    with pytest.raises(MetadataError, match=r"valid choices: \['chexpert', 'covid', 'csv'"):
        M.load_source("padchest", "/tmp")


# ------------------------------------------------------------------------------------- real data
@needs_shared
def test_real_covid():
    r = M.load_covid(SHARED / "covid-chestxray")
    raw = pd.read_csv(SHARED / "covid-chestxray" / "metadata.csv")
    t = r.table
    assert len(t) + len(r.bad) == len(raw) == 384 and len(r.bad) == 0
    assert t["patient_id"].nunique() == raw["patientid"].nunique() == 192
    assert {"LATERAL", "PA", "AP", "AP_SUPINE", "UNKNOWN"} == set(t["view"])
    assert (t["view"] == "LATERAL").sum() == (raw["view"] == "L").sum()
    assert (t["study_order"] == -1).sum() == pd.to_numeric(raw["offset"], errors="coerce").isna().sum()
    assert (t["No Finding"] == 1).sum() == (raw["finding"] == "No Finding").sum()
    # every real finding except todo / No Finding / ARDS names a pneumonia or its pathogen
    assert (t["Pneumonia"] == 1).sum() == (~raw["finding"].isin(["todo", "No Finding", "ARDS"])).sum() == 290
    assert (t["report"] != "").sum() == raw["clinical_notes"].notna().sum()
    assert all((SHARED / "covid-chestxray" / p).is_file() for p in t["path"])


@needs_shared
def test_real_nih1000_and_shared():
    r = M.load_nih(SHARED / "nih1000")
    assert len(r.table) == 1000 and r.table["patient_id"].nunique() == 264 and r.bad == []
    raw = pd.read_csv(SHARED / "nih1000" / "Data_Entry_2017_v2020.csv")
    assert (r.table["Pleural Effusion"] == 1).sum() == raw["Finding Labels"].str.contains("Effusion").sum()
    assert all((SHARED / "nih1000" / p).is_file() for p in r.table["path"])
    s = M.load_shared(SHARED)
    assert len(s.table) == 1384 and s.table["patient_id"].nunique() == 192 + 264
    assert s.table["source"].value_counts().to_dict() == {"nih-cxr14": 1000, "covid-chestxray": 384}
    assert all((SHARED / p).is_file() for p in s.table["path"])


@needs_shared
def test_real_chexpert_train():
    path = SHARED / "metadata" / "chexpert_train.csv.gz"
    r = M.load_chexpert_csv(path)  # its load time is benchmarks/prepare_bench.py's "table" line
    raw = pd.read_csv(path)
    ids = raw["Path"].str.split("/")
    t = r.table
    assert len(t) == len(raw) == 223_414 and r.bad == []
    assert t["patient_id"].nunique() == ids.str[2].nunique() == 64_540
    assert t["study_id"].nunique() == (ids.str[2] + ids.str[3]).nunique()
    assert (t["view"] == "LATERAL").sum() == (raw["Frontal/Lateral"] == "Lateral").sum()
    # studies numbered >= 10 exist and are ordered numerically
    num = ids.str[3].str[5:].astype(int)
    assert (num >= 10).sum() > 0
    expect = num.groupby(ids.str[2]).rank(method="dense").astype(int) - 1
    assert t["study_order"].tolist() == expect.tolist()
    for c in CHEXPERT_LABELS:
        np.testing.assert_array_equal(t[c].to_numpy(), raw[c].to_numpy(dtype=np.float32))


@needs_shared
def test_real_openi_reports():
    df = M.load_openi_reports(SHARED / "iu-reports" / "NLMCXR_reports.tgz")
    assert len(df) == 3955 and df["report_id"].is_unique and df.attrs["bad"] == []
    assert (df["report"] != "").mean() > 0.95
    assert df["image_ids"].map(len).sum() > 7000
    assert df.loc[0, "report_id"] == "CXR1" and df.loc[0, "image_ids"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]


@needs_shared
def test_real_nih_full_metadata():
    path = SHARED / "metadata" / "Data_Entry_2017_v2020.csv.gz"
    r = M.load_nih(path)
    raw = pd.read_csv(path)
    assert len(r.table) == len(raw) == 112_120 and r.bad == []
    assert r.table["patient_id"].nunique() == raw["Patient ID"].nunique() == 30_805
    assert (r.table["Lung Lesion"] == 1).sum() == raw["Finding Labels"].str.contains("Mass|Nodule").sum()
    assert (r.table["No Finding"] == 1).sum() == (raw["Finding Labels"] == "No Finding").sum()


def chexpert_test_labels(path: Path, rows) -> Path:
    """CheXpert's test-set labels file: Path + the 14 observations, no Sex/Age/view columns."""
    lines = ["Path," + ",".join(CHEXPERT_LABELS)]
    for p, labs in rows:
        lines.append(",".join([p] + [labs.get(c, "0") for c in CHEXPERT_LABELS]))
    return write(path, "\n".join(lines) + "\n")


def test_chexpert_test_set_labels_make_the_test_split(tmp_path):
    folder = tmp_path / "CheXpert-v1.0-small"
    chexpert_train(folder)
    write(folder / "valid.csv", CHEXPERT_HEADER + "\n" +
          chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", Edema="0.0") + "\n")
    test_rows = [("test/patient64741/study1/view1_frontal.jpg", {"Pleural Effusion": "1"}),
                 ("test/patient64741/study1/view2_lateral.jpg", {"Pleural Effusion": "1"}),
                 ("test/patient64742/study1/view1_frontal.jpg", {"Cardiomegaly": "1"})]
    # without the test labels: valid.csv is the test split (the default, as before)
    assert M.load_chexpert(folder).table.set_index("image_id").loc["patient64541/study1/view1_frontal", "split"] == "test"
    chexpert_test_labels(folder / "test_labels.csv", test_rows)
    for kw in ({}, {"test_labels": folder / "test_labels.csv"}):  # found in the folder, or given
        r = M.load_chexpert(tmp_path, **kw)
        t = r.table.set_index("image_id")
        assert r.root == tmp_path and len(t) == 7 + 1 + 3
        assert t.loc["patient64541/study1/view1_frontal", "split"] == "valid"  # valid.csv -> valid
        test = t[t.split == "test"]
        assert sorted(test.index) == ["patient64741/study1/view1_frontal", "patient64741/study1/view2_lateral",
                                      "patient64742/study1/view1_frontal"]
        assert test.path.tolist() == ["CheXpert-v1.0-small/" + p for p, _ in test_rows]  # relative to the root
        assert test.laterality.tolist() == ["frontal", "lateral", "frontal"]  # from the file names
        assert test.view.tolist() == ["FRONTAL", "LATERAL", "FRONTAL"]
        assert test["Pleural Effusion"].tolist() == [1.0, 1.0, 0.0] and test["Cardiomegaly"].tolist() == [0.0, 0.0, 1.0]
        assert set(t.split[t.patient_id.isin(["patient00001", "patient00002", "patient00003"])]) == {"train"}
    assert set(M.load_chexpert(folder, test_labels=False).table.split) <= {"train", "valid", "test"}
    assert (M.load_chexpert(folder, test_labels=False).table.split == "test").sum() == 1  # valid.csv again
    with pytest.raises(MetadataError, match="test labels .*nope.csv not found"):
        M.load_chexpert(folder, test_labels=tmp_path / "nope.csv")
