"""Importers of the real layouts (prostate, fundus, polyp, NVFlare prostate) on tiny fixture trees."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from lcfed.ops.data.importers import (
    FRACTIONS,
    KINDS,
    import_dataset,
    import_fundus,
    import_nvflare_prostate,
    import_polyp,
    import_prostate,
)
from lcfed.runtime.data.layout import SPLITS, DataError, load_datalist, load_dataset_info, split_by_patient

ZOOMS = (0.5, 0.6, 3.0)
SHAPE = (16, 12)  # not square, so a transposed slice would show
PROSTATE_Z = (1, 2, 3)  # slices of the 5 that hold prostate


# ---------------------------------------------------------------------------------------------
# Fixture writers
# ---------------------------------------------------------------------------------------------


def write_nifti(path: Path, data: np.ndarray, zooms=ZOOMS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))


def site_seed(site: str, i: int) -> int:
    return zlib.crc32(f"{site}/{i}".encode())


def prostate_volumes(seed: int, value: int = 1, with_prostate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 500, (*SHAPE, 5)).astype(np.float32)
    mask = np.zeros((*SHAPE, 5), np.uint8)
    if with_prostate:
        for z in PROSTATE_Z:
            mask[4 + z : 10, 3 : 6 + z, z] = value  # a different, asymmetric blob per slice
    return image, mask


def make_prostate_site(src: Path, site: str, n: int, value: int = 1, seg: str = "segmentation", empty=()) -> None:
    for i in range(n):
        image, mask = prostate_volumes(site_seed(site, i), value, with_prostate=i not in empty)
        write_nifti(src / site / f"Case{i:02d}.nii.gz", image)
        write_nifti(src / site / f"Case{i:02d}_{seg}.nii.gz", mask)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def fundus_mask(seed: int) -> np.ndarray:
    """255 background, a 128 disc rim around a 0 cup, with small lossy-looking perturbations."""
    rng = np.random.default_rng(seed)
    mask = np.full((20, 20), 255, np.int16)
    mask[4:16, 5:15] = 128
    mask[7:12, 8:12] = 0
    mask += rng.integers(-6, 7, mask.shape)
    return np.clip(mask, 0, 255).astype(np.uint8)


FUNDUS_CODES = {"bg": 0, "rim": 1, "cup": 2}


def expected_fundus_codes() -> np.ndarray:
    codes = np.zeros((20, 20), np.uint8)
    codes[4:16, 5:15] = 1
    codes[7:12, 8:12] = 2
    return codes


def make_fundus_domain(src: Path, domain: str, parts: dict[str, int], rgb_masks: bool = False) -> None:
    rng = np.random.default_rng(len(domain))
    for part, n in parts.items():
        for i in range(n):
            stem = f"img{i}"  # train and test reuse names, as in the real release
            write_png(
                src / domain / part / "ROIs" / "image" / f"{stem}.png", rng.integers(0, 255, (20, 20, 3), np.uint8)
            )
            mask = fundus_mask(i)
            write_png(
                src / domain / part / "ROIs" / "mask" / f"{stem}.png", np.stack([mask] * 3, -1) if rgb_masks else mask
            )


def polyp_mask() -> np.ndarray:
    mask = np.zeros((20, 20), np.uint8)
    mask[5:12, 6:15] = 255
    return mask


def make_polyp_site(root: Path, folder: str, n: int, ext: str = ".png", names: list[str] | None = None) -> None:
    rng = np.random.default_rng(n)
    for stem in names or [str(i + 1) for i in range(n)]:
        write_png(root / folder / "images" / f"{stem}{ext}", rng.integers(0, 255, (20, 20, 3), np.uint8))
        write_png(root / folder / "masks" / f"{stem}.png", polyp_mask())


# PraNet's TrainDataset mixes Kvasir-SEG ids and CVC-ClinicDB frame numbers in one folder
KVASIR_TRAIN = ["cju0qkwl35piu0993l0dewei2", "cju0roawvklrq0799vmjorwfv", "ck2bxiswtxuw80838qkisqjwz"]
CLINICDB_TRAIN = ["1", "2", "3", "4", "5"]


def make_nvflare_client(data_dir: Path, client: str, n: int) -> list[str]:
    names = []
    for i in range(n):
        name = f"{client}_{i:02d}"
        image, mask = prostate_volumes(i)
        write_nifti(data_dir / client / "Image" / f"{name}.nii.gz", image)
        write_nifti(data_dir / client / "Mask" / f"{name}.nii.gz", mask)
        names.append(name)
    return names


def nvflare_datalist(client: str, splits: dict[str, list[str]]) -> dict:
    return {
        split: [{"image": f"{client}/Image/{c}.nii.gz", "label": f"{client}/Mask/{c}.nii.gz"} for c in cases]
        for split, cases in splits.items()
    }


def load_nifti(path: str) -> nib.Nifti1Image:
    return nib.load(path)


def all_entries(datalist: dict) -> list[dict]:
    return [e for split in SPLITS for e in datalist[split]]


def split_of_cases(datalist: dict) -> dict[str, set[str]]:
    """case id -> the splits it appears in."""
    out: dict[str, set[str]] = {}
    for split in SPLITS:
        for e in datalist[split]:
            out.setdefault(e["case_id"], set()).add(split)
    return out


# ---------------------------------------------------------------------------------------------
# Prostate
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def prostate_src(tmp_path: Path) -> Path:
    src = tmp_path / "prostate"
    make_prostate_site(src, "RUNMC", 4, empty=(3,))  # Case03 has no prostate at all
    make_prostate_site(src, "BIDMC", 3)
    make_prostate_site(src, "HK", 3, value=2, seg="Segmentation")
    (src / "README.txt").write_text("not a site")
    return src


def test_prostate_finds_sites_in_canonical_order_and_keeps_slices_with_prostate(prostate_src, tmp_path):
    out = tmp_path / "out"
    info = import_prostate(prostate_src, out)

    assert info.sites == ["runmc", "bidmc", "hk"]
    back = load_dataset_info(out)
    assert back.sites == info.sites
    assert (back.channels, back.labels, back.largest_component) == (1, {"prostate": [1]}, True)
    assert back.extra["kind"] == "prostate"
    expected_cases = {"runmc": 3, "bidmc": 3, "hk": 3}
    for site, n_cases in expected_cases.items():
        dl = load_datalist(out / site, site)
        entries = all_entries(dl)
        assert len(entries) == n_cases * len(PROSTATE_Z)
        assert {e["slice"] for e in entries} == set(PROSTATE_Z)  # slices 0 and 4 hold no prostate
        assert back.extra["sites"][site]["cases"] == n_cases
        assert back.extra["sites"][site]["images"] == len(entries)
        assert all(Path(e["image"]).name == f"{e['case_id']}_{e['slice']:03d}.nii.gz" for e in entries)
    assert "Case03" not in split_of_cases(load_datalist(out / "runmc", "runmc"))
    assert back.extra["sites"]["runmc"]["dropped_cases"] == ["Case03"]


def test_prostate_labels_images_and_spacing(prostate_src, tmp_path):
    out = tmp_path / "out"
    import_prostate(prostate_src, out)
    # HK spells _Segmentation and stores prostate as 2: it must come out as code 1
    dl = load_datalist(out / "hk", "hk")
    assert dl["spacing"] == pytest.approx(list(ZOOMS))
    for e in all_entries(dl):
        _, src_mask = prostate_volumes(site_seed("HK", int(e["case_id"][4:])), value=2)
        label = load_nifti(e["label"])
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(label.dataobj), (src_mask[:, :, e["slice"]] > 0).astype(np.uint8))
        image = load_nifti(e["image"])
        data = np.asarray(image.dataobj)
        assert image.get_data_dtype() == np.float32 and data.shape == SHAPE
        assert data.min() == pytest.approx(0.0) and data.max() == pytest.approx(1.0)
        assert (data == 1.0).mean() >= 0.01  # values above the 99th percentile are clipped to 1
        assert image.header.get_zooms()[:2] == pytest.approx(ZOOMS[:2])
        assert e["spacing"] == pytest.approx(list(ZOOMS))


def test_prostate_splits_by_patient(tmp_path):
    src = tmp_path / "prostate"
    make_prostate_site(src, "UCL", 10)
    info = import_prostate(src, tmp_path / "out", seed=3)
    dl = load_datalist(tmp_path / "out" / "ucl", "ucl")
    splits = split_of_cases(dl)
    assert set(splits) == {f"Case{i:02d}" for i in range(10)}
    assert all(len(s) == 1 for s in splits.values())  # every slice of a case in the same split
    n_cases = {split: len({e["case_id"] for e in dl[split]}) for split in SPLITS}
    assert n_cases == {"training": 7, "validation": 1, "testing": 2}
    assert info.extra["sites"]["ucl"]["testing"]["cases"] == 2


def test_prostate_resize(prostate_src, tmp_path):
    out = tmp_path / "out"
    import_prostate(prostate_src, out, size=8)
    dl = load_datalist(out / "bidmc", "bidmc")
    expected_spacing = [ZOOMS[0] * SHAPE[0] / 8, ZOOMS[1] * SHAPE[1] / 8, ZOOMS[2]]
    assert dl["spacing"] == pytest.approx(expected_spacing)
    for e in all_entries(dl):
        image, label = load_nifti(e["image"]), load_nifti(e["label"])
        assert image.shape == (8, 8) and label.shape == (8, 8)
        assert set(np.unique(np.asarray(label.dataobj))) == {0, 1}  # nearest: no blended codes
        assert image.header.get_zooms()[:2] == pytest.approx(expected_spacing[:2])


def test_prostate_wrong_layout_names_folder_and_expected_layout(tmp_path):
    src = tmp_path / "prostate"
    write_nifti(src / "Site1" / "Case00.nii.gz", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(DataError, match="RUNMC") as e:
        import_prostate(src, tmp_path / "out")
    assert e.value.file == str(src)
    assert "Site1/" in str(e.value) and "CaseNN_segmentation.nii.gz" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_prostate_missing_mask(prostate_src, tmp_path):
    (prostate_src / "BIDMC" / "Case01_segmentation.nii.gz").unlink()
    with pytest.raises(DataError, match="image has no mask") as e:
        import_prostate(prostate_src, tmp_path / "out")
    assert e.value.site == "bidmc" and e.value.file.endswith("BIDMC/Case01.nii.gz")
    assert "Case01_segmentation.nii.gz" in str(e.value)


def test_prostate_mask_without_image(prostate_src, tmp_path):
    (prostate_src / "HK" / "Case02.nii.gz").unlink()
    with pytest.raises(DataError, match="mask has no image") as e:
        import_prostate(prostate_src, tmp_path / "out")
    assert e.value.site == "hk" and e.value.file.endswith("Case02_Segmentation.nii.gz")


def test_prostate_corrupt_volume(prostate_src, tmp_path):
    (prostate_src / "RUNMC" / "Case01.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a readable NIfTI file") as e:
        import_prostate(prostate_src, tmp_path / "out")
    assert e.value.site == "runmc" and e.value.file.endswith("RUNMC/Case01.nii.gz")


def test_prostate_shape_mismatch(prostate_src, tmp_path):
    write_nifti(prostate_src / "BIDMC" / "Case00_segmentation.nii.gz", np.ones((*SHAPE, 4), np.uint8))
    with pytest.raises(DataError, match=r"image shape \(16, 12, 5\) and mask shape \(16, 12, 4\) differ") as e:
        import_prostate(prostate_src, tmp_path / "out")
    assert e.value.site == "bidmc" and e.value.file.endswith("Case00_segmentation.nii.gz")


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="source folder not found") as e:
        import_dataset("prostate", tmp_path / "nope", tmp_path / "out")
    assert e.value.file == str(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Output folder safety
# ---------------------------------------------------------------------------------------------


def test_refuses_non_empty_output_without_overwrite(prostate_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty.*overwrite=True"):
        import_prostate(prostate_src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    import_prostate(prostate_src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and load_dataset_info(out).sites == ["runmc", "bidmc", "hk"]


def test_failed_import_leaves_existing_output_intact(prostate_src, tmp_path):
    out = tmp_path / "out"
    import_prostate(prostate_src, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # HK is imported last: BIDMC and RUNMC are already written to the staging folder when it fails
    (prostate_src / "HK" / "Case02.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        import_prostate(prostate_src, out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "prostate"]  # no staging folder left


def test_output_must_not_contain_source(prostate_src):
    with pytest.raises(DataError, match="must not contain the source"):
        import_prostate(prostate_src, prostate_src.parent, overwrite=True)
    assert (prostate_src / "RUNMC" / "Case00.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------
# Fundus
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fundus_src(tmp_path: Path) -> Path:
    src = tmp_path / "Fundus"
    make_fundus_domain(src, "Domain1", {"train": 3, "test": 2})
    make_fundus_domain(src, "Domain3", {"train": 4}, rgb_masks=True)
    return src


def test_fundus_sites_cases_and_label_codes(fundus_src, tmp_path):
    out = tmp_path / "out"
    info = import_dataset("fundus", fundus_src, out)
    assert info.sites == ["drishti-gs", "refuge-train"]
    back = load_dataset_info(out)
    assert (back.channels, back.labels, back.largest_component) == (3, {"disc": [1, 2], "cup": [2]}, True)
    expected = expected_fundus_codes()
    for site, cases in {
        "drishti-gs": {"train_img0", "train_img1", "train_img2", "test_img0", "test_img1"},
        "refuge-train": {f"train_img{i}" for i in range(4)},
    }.items():
        dl = load_datalist(out / site, site)
        assert set(split_of_cases(dl)) == cases  # train/test stems kept apart
        assert back.extra["sites"][site]["images"] == len(cases)
        for e in all_entries(dl):
            assert Path(e["image"]).name == f"{e['case_id']}.png"
            image = np.asarray(Image.open(e["image"]))
            label = np.asarray(Image.open(e["label"]))
            assert image.shape == (20, 20, 3) and label.dtype == np.uint8 and label.shape == (20, 20)
            np.testing.assert_array_equal(label, expected)  # 0 -> cup 2, 128 -> rim 1, 255 -> 0


def test_fundus_pools_train_and_test_and_splits_by_patient(tmp_path):
    src = tmp_path / "Fundus"
    make_fundus_domain(src, "Domain2", {"train": 6, "test": 4})
    import_fundus(src, tmp_path / "out")
    dl = load_datalist(tmp_path / "out" / "rim-one-r3", "rim-one-r3")
    splits = split_of_cases(dl)
    assert len(splits) == 10 and all(len(s) == 1 for s in splits.values())
    assert {split: len(dl[split]) for split in SPLITS} == {"training": 7, "validation": 1, "testing": 2}


def test_fundus_resize(fundus_src, tmp_path):
    import_fundus(fundus_src, tmp_path / "out", size=10)
    dl = load_datalist(tmp_path / "out" / "drishti-gs", "drishti-gs")
    for e in all_entries(dl):
        assert np.asarray(Image.open(e["image"])).shape == (10, 10, 3)
        label = np.asarray(Image.open(e["label"]))
        # nearest neighbour: the codes of a plain subsampling, never a blend of cup and background
        nearest = Image.fromarray(expected_fundus_codes()).resize((10, 10), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(label, np.asarray(nearest))


def test_fundus_rejects_unexpected_mask_values(fundus_src, tmp_path):
    bad = fundus_mask(0)
    bad[0, 0] = 64
    path = fundus_src / "Domain3" / "train" / "ROIs" / "mask" / "img2.png"
    write_png(path, bad)
    with pytest.raises(DataError, match=r"mask values 64 are not near 0 \(cup\), 128 \(disc rim\) or 255") as e:
        import_fundus(fundus_src, tmp_path / "out")
    assert e.value.site == "refuge-train" and e.value.file == str(path)


def test_fundus_corrupt_png(fundus_src, tmp_path):
    path = fundus_src / "Domain1" / "test" / "ROIs" / "image" / "img1.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="not a readable image file") as e:
        import_fundus(fundus_src, tmp_path / "out")
    assert e.value.site == "drishti-gs" and e.value.file == str(path)


def test_fundus_missing_mask_and_shape_mismatch(fundus_src, tmp_path):
    mask = fundus_src / "Domain1" / "train" / "ROIs" / "mask" / "img1.png"
    mask.unlink()
    with pytest.raises(DataError, match="image has no mask") as e:
        import_fundus(fundus_src, tmp_path / "out")
    assert e.value.file.endswith("train/ROIs/image/img1.png") and "mask/img1.png" in str(e.value)

    write_png(mask, np.full((20, 18), 255, np.uint8))
    with pytest.raises(DataError, match=r"image shape \(20, 20, 3\) and mask shape \(20, 18\) differ") as e:
        import_fundus(fundus_src, tmp_path / "out")
    assert e.value.file == str(mask)


def test_fundus_wrong_layout(tmp_path):
    src = tmp_path / "Fundus"
    write_png(src / "Domain1" / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"expected train/ROIs/\{image,mask\}") as e:
        import_fundus(src, tmp_path / "out")
    assert e.value.site == "drishti-gs" and "images/" in str(e.value)

    with pytest.raises(DataError, match="Domain1..Domain4") as e:
        import_fundus(src / "Domain1", tmp_path / "out")
    assert e.value.file == str(src / "Domain1")


# ---------------------------------------------------------------------------------------------
# Polyp
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def polyp_src(tmp_path: Path) -> Path:
    src = tmp_path / "PraNet"
    make_polyp_site(src / "TestDataset", "Kvasir", 4, ext=".jpg")
    make_polyp_site(src / "TestDataset", "ETIS-LaribPolypDB", 5)
    make_polyp_site(src / "TestDataset", "CVC-ClinicDB", 2)
    make_polyp_site(src / "TestDataset", "CVC-300", 3)  # not an LC-Fed site
    make_polyp_site(src, "TrainDataset", 0, names=KVASIR_TRAIN + CLINICDB_TRAIN)
    return src


def test_polyp_sites_labels_and_splits(polyp_src, tmp_path):
    out = tmp_path / "out"
    info = import_polyp(polyp_src, out)
    assert info.sites == ["kvasir", "etis", "cvc-clinicdb"]
    back = load_dataset_info(out)
    assert (back.channels, back.labels, back.largest_component) == (3, {"polyp": [1]}, False)
    expected = (polyp_mask() > 0).astype(np.uint8)
    # Kvasir and CVC-ClinicDB whole: their TestDataset images pooled with theirs from TrainDataset (by file
    # name), the same numbers (1.png, 2.png) in both folders kept apart by the train_ prefix
    cases = {
        "kvasir": {str(i + 1) for i in range(4)} | {f"train_{s}" for s in KVASIR_TRAIN},
        "etis": {str(i + 1) for i in range(5)},
        "cvc-clinicdb": {"1", "2"} | {f"train_{s}" for s in CLINICDB_TRAIN},
    }
    for site, ids in cases.items():
        dl = load_datalist(out / site, site)
        splits = split_of_cases(dl)
        assert set(splits) == ids and all(len(s) == 1 for s in splits.values())
        assert all(dl[split] for split in SPLITS)
        for e in all_entries(dl):
            assert np.asarray(Image.open(e["image"])).shape == (20, 20, 3)
            np.testing.assert_array_equal(np.asarray(Image.open(e["label"])), expected)
    # pooled before the split: training images of PraNet's TrainDataset land in every split, not one
    kvasir = {c: s.pop() for c, s in split_of_cases(load_datalist(out / "kvasir", "kvasir")).items()}
    whole = split_by_patient(cases["kvasir"], FRACTIONS, seed=0)
    assert kvasir == {c: split for split, ids in whole.items() for c in ids}
    sites = back.extra["sites"]
    assert (sites["kvasir"]["pranet_train_images"], sites["kvasir"]["pranet_test_images"]) == (3, 4)
    assert (sites["cvc-clinicdb"]["pranet_train_images"], sites["cvc-clinicdb"]["pranet_test_images"]) == (5, 2)


def test_polyp_accepts_testdataset_folder_and_resizes(polyp_src, tmp_path):
    info = import_dataset("polyp", polyp_src / "TestDataset", tmp_path / "out", size=8)
    assert info.sites == ["kvasir", "etis", "cvc-clinicdb"]  # the TrainDataset beside it is found too
    assert len(split_of_cases(load_datalist(tmp_path / "out" / "kvasir", "kvasir"))) == 4 + len(KVASIR_TRAIN)
    e = all_entries(load_datalist(tmp_path / "out" / "etis", "etis"))[0]
    assert np.asarray(Image.open(e["image"])).shape == (8, 8, 3)
    assert set(np.unique(np.asarray(Image.open(e["label"])))) == {0, 1}


def test_polyp_train_dataset_alone_gives_its_two_sites(tmp_path):
    src = tmp_path / "PraNet"
    make_polyp_site(src, "TrainDataset", 0, names=KVASIR_TRAIN + CLINICDB_TRAIN)
    info = import_polyp(src, tmp_path / "out")
    assert info.sites == ["kvasir", "cvc-clinicdb"]


def test_polyp_train_image_of_no_known_site_is_named(polyp_src, tmp_path):
    make_polyp_site(polyp_src, "TrainDataset", 0, names=["Frame_07"])
    with pytest.raises(DataError, match="cannot tell which site") as e:
        import_polyp(polyp_src, tmp_path / "out")
    assert e.value.file.endswith("TrainDataset/images/Frame_07.png")


def test_polyp_without_any_site_folder_is_a_layout_error(tmp_path):
    src = tmp_path / "PraNet"
    make_polyp_site(src / "TestDataset", "CVC-300", 2)
    with pytest.raises(DataError, match="TestDataset/.*ETIS-LaribPolypDB"):
        import_polyp(src, tmp_path / "out")


def test_polyp_missing_mask_and_shape_mismatch(polyp_src, tmp_path):
    mask = polyp_src / "TestDataset" / "Kvasir" / "masks" / "2.png"
    mask.unlink()
    with pytest.raises(DataError, match="image has no mask") as e:
        import_polyp(polyp_src, tmp_path / "out")
    assert e.value.site == "kvasir" and e.value.file.endswith("Kvasir/images/2.jpg")

    write_png(mask, np.zeros((19, 20), np.uint8))
    with pytest.raises(DataError, match="shape .* differ") as e:
        import_polyp(polyp_src, tmp_path / "out")
    assert e.value.file == str(mask)


# ---------------------------------------------------------------------------------------------
# NVFlare prostate
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def nvflare_src(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "data_preparation"
    cases = make_nvflare_client(root / "dataset", "I2CVB", 5)
    splits = {"training": cases[:2], "validation": cases[2:4], "testing": cases[4:]}
    (root / "datalist").mkdir()
    (root / "datalist" / "client_I2CVB.json").write_text(json.dumps(nvflare_datalist("I2CVB", splits)))
    make_nvflare_client(root / "dataset", "MSD", 4)  # no datalist: split by patient
    return root, splits


def test_nvflare_keeps_datalist_splits(nvflare_src, tmp_path):
    root, splits = nvflare_src
    out = tmp_path / "out"
    info = import_nvflare_prostate(root, out)
    assert info.sites == ["i2cvb", "msd"]
    dl = load_datalist(out / "i2cvb", "i2cvb")
    assert {split: sorted({e["case_id"] for e in dl[split]}) for split in SPLITS} == splits
    assert len(all_entries(dl)) == 5 * len(PROSTATE_Z)
    assert dl["spacing"] == pytest.approx(list(ZOOMS))
    assert info.extra["sites"]["i2cvb"]["datalist"].endswith("client_I2CVB.json")

    msd = load_datalist(out / "msd", "msd")
    assert set(split_of_cases(msd)) == {f"MSD_{i:02d}" for i in range(4)}
    assert all(len(s) == 1 for s in split_of_cases(msd).values())
    assert info.extra["sites"]["msd"]["datalist"] is None


def test_nvflare_accepts_dataset_folder(nvflare_src, tmp_path):
    root, splits = nvflare_src
    info = import_dataset("nvflare-prostate", root / "dataset", tmp_path / "out", size=8)
    assert info.sites == ["i2cvb", "msd"]
    dl = load_datalist(tmp_path / "out" / "i2cvb", "i2cvb")
    assert sorted({e["case_id"] for e in dl["testing"]}) == splits["testing"]  # datalist found from dataset/
    assert load_nifti(dl["testing"][0]["image"]).shape == (8, 8)


def test_nvflare_datalist_pointing_at_missing_file(nvflare_src, tmp_path):
    root, _ = nvflare_src
    (root / "dataset" / "I2CVB" / "Image" / "I2CVB_03.nii.gz").unlink()
    (root / "dataset" / "I2CVB" / "Mask" / "I2CVB_03.nii.gz").unlink()
    with pytest.raises(DataError, match=r"validation\[1\] image 'I2CVB/Image/I2CVB_03.nii.gz' not found") as e:
        import_nvflare_prostate(root, tmp_path / "out")
    assert e.value.site == "i2cvb" and e.value.file.endswith("client_I2CVB.json")


def test_nvflare_wrong_layout(tmp_path):
    src = tmp_path / "nv"
    make_prostate_site(src, "RUNMC", 1)  # the 6-site layout is not the NVFlare one
    with pytest.raises(DataError, match=r"expected dataset/<client>/\{Image,Mask\}") as e:
        import_nvflare_prostate(src, tmp_path / "out")
    assert "RUNMC/" in str(e.value) and e.value.file == str(src)


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------


def test_unknown_kind_lists_the_kinds(tmp_path):
    with pytest.raises(ValueError, match="unknown data set kind 'mri'") as e:
        import_dataset("mri", tmp_path, tmp_path / "out")
    assert all(kind in str(e.value) for kind in KINDS)
    assert not isinstance(e.value, DataError)
