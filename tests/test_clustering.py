"""Clustering metrics against scikit-learn and known answers; token grid alignment; ``smartformer cluster``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from smartformer.analysis import clustering as C
from smartformer.cli import main
from smartformer.data.phantom import LABELS, write_phantoms
from smartformer.models.smartformer import SMARTFormer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    (case,) = write_phantoms(
        tmp_path_factory.mktemp("ph"),
        n=1,
        seed=7,
        shape=(64, 64, 48),
        spacing=(5.0, 5.0, 5.0),
        progress=False,
        n_lesions=1,
    )
    return case


def test_scores_agree_with_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    clusters = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 4, 300))
    s = C.clustering_scores(labels, clusters)
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert s["ari"] == pytest.approx(adjusted_rand_score(labels, clusters))
    assert C.clustering_scores(labels, (labels + 1) % 4) == {
        "nmi": pytest.approx(1.0),
        "ari": pytest.approx(1.0),
        "purity": 1.0,
    }


def test_purity_of_a_known_contingency():
    # cluster 0: 3 x a, 1 x b; cluster 1: 2 x b, 2 x c; cluster 2: 2 x c -> (3 + 2 + 2) / 10
    labels = ["a", "a", "a", "b", "b", "b", "c", "c", "c", "c"]
    clusters = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert C.purity(labels, clusters) == pytest.approx(0.7)


def test_centroid_separation_known_geometry():
    # two labels, each a pair of points at distance 2 around centroids 10 apart: spread 1, ratio 10
    feats = np.array([[-1.0, 0], [1.0, 0], [9.0, 0], [11.0, 0], [50.0, 50.0]])
    labels = np.array([1, 1, 2, 2, 3])  # label 3 has one item: left out
    sep = C.centroid_separation(feats, labels)
    assert sep["labels"] == [1, 2]
    assert sep["mean_ratio"] == pytest.approx(10.0)
    assert sep["spread"] == pytest.approx([1.0, 1.0])
    # the paper's measures: every item 1 from its centroid; one pair of centroids, 10 apart
    assert sep["intra_distance"] == pytest.approx({"mean": 1.0, "sd": 0.0})
    assert sep["inter_distance"] == pytest.approx({"mean": 10.0, "sd": 0.0})


def test_intra_and_inter_cluster_distances_mean_and_sd():
    # label 0: distances 1 and 3 to the centroid (0, 0); label 1 centroid (3, 4); label 2 centroid (0, 8)
    feats = np.array([[1.0, 0], [-1.0, 0], [0, 3.0], [0, -3.0], [3.0, 4], [3.0, 4], [0, 8.0], [0, 8.0]])
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    sep = C.centroid_separation(feats, labels)
    intra = np.array([1, 1, 3, 3, 0, 0, 0, 0], dtype=float)
    inter = np.array([5.0, 8.0, 5.0])  # |(0,0)-(3,4)|, |(0,0)-(0,8)|, |(3,4)-(0,8)|
    assert sep["intra_distance"] == pytest.approx({"mean": intra.mean(), "sd": intra.std()})
    assert sep["inter_distance"] == pytest.approx({"mean": inter.mean(), "sd": inter.std()})


def test_kmeans_finds_separated_groups():
    rng = np.random.default_rng(1)
    centres = np.eye(3) * 10
    feats = np.concatenate([c + rng.normal(0, 0.1, (40, 3)) for c in centres])
    truth = np.repeat([0, 1, 2], 40)
    assert C.clustering_scores(truth, C.kmeans_clusters(feats, 3))["ari"] == pytest.approx(1.0)


def test_label_names(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"labels": {"1": "liver", "2": "spleen"}}))
    assert C.load_label_names(path, [1, 3]) == {1: "liver", 3: "label 3"}
    path.write_text("[1, 2]")
    with pytest.raises(Exception, match="expected"):
        C.load_label_names(path, [1])


class _PoolModel(torch.nn.Module):
    """Stand-in network: tokens are the 4^3 average of the input, so features follow the anatomy."""

    config = SimpleNamespace(semantic_stride=4)

    def forward_features(self, x: torch.Tensor) -> dict:
        pooled = F.avg_pool3d(x, 4)
        return {"tokens": pooled.flatten(2).transpose(1, 2), "grid": tuple(pooled.shape[2:])}


def test_token_grid_lands_on_the_input_grid(phantom, tmp_path):
    """Token majority labels, written back on the CT grid, agree with the labels; also for an LPS copy."""
    labels = np.asarray(nib.load(str(phantom / "labels.nii.gz")).dataobj)
    tokens = C.token_features(
        _PoolModel(), phantom / "ct.nii.gz", phantom / "labels.nii.gz", spacing=5.0, roi=32, progress=False
    )
    assert tokens.features.shape[:3] == tokens.labels.shape == (16, 16, 16)  # 64 x 64 x 48 padded to 32s, / 4
    back = C.clusters_on_input(np.clip(tokens.labels, 0, None), tokens)
    assert back.shape == labels.shape
    body = labels > 0
    assert (back[body] == labels[body]).mean() > 0.6
    agreement = (back[body] == labels[body]).mean()
    for axis in range(3):  # a grid off by half a token either way agrees less
        for shift in (-2, 2):
            assert (np.roll(back, shift, axis)[body] == labels[body]).mean() < agreement - 0.01

    src = nib.load(str(phantom / "ct.nii.gz"))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(labels.shape[:2]) - 1
    nib.save(
        nib.Nifti1Image(np.asarray(src.dataobj)[::-1, ::-1].copy(), src.affine @ flip), str(tmp_path / "ct.nii.gz")
    )
    lps = C.token_features(
        _PoolModel(), tmp_path / "ct.nii.gz", phantom / "labels.nii.gz", spacing=5.0, roi=32, progress=False
    )
    np.testing.assert_array_equal(lps.labels, tokens.labels)
    np.testing.assert_array_equal(C.clusters_on_input(np.clip(lps.labels, 0, None), lps)[::-1, ::-1], back)


def run_cluster(model: Path, case: Path, out: Path, *extra: str) -> int:
    """``smartformer cluster`` of a case folder's ct.nii.gz and labels.nii.gz at 5 mm in 32^3 windows, no
    progress bar, then ``extra``."""
    return main(
        [
            "cluster",
            "--checkpoint",
            str(model),
            "--image",
            str(case / "ct.nii.gz"),
            "--labels",
            str(case / "labels.nii.gz"),
            "--out",
            str(out),
            "--spacing",
            "5",
            "--roi",
            "32",
            "--no-progress",
            *extra,
        ]
    )


def test_cluster_command_end_to_end(phantom, tmp_path, capsys):
    torch.manual_seed(0)
    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path / "model")
    assert run_cluster(tmp_path / "model", phantom, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "ct_clustering.json").read_text())
    assert 0 <= report["nmi"] <= 1 and -1 <= report["ari"] <= 1 and 0 < report["purity"] <= 1
    assert report["k"] == len(report["tokens_per_label"]) >= 2
    assert set(report["tokens_per_label"]) <= set(LABELS.values())  # names from labels.json next to the labels
    out = nib.load(str(tmp_path / "out" / "ct_clusters.nii.gz"))
    src = nib.load(str(phantom / "ct.nii.gz"))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(out.dataobj))) <= set(range(report["k"] + 1))
    assert (tmp_path / "out" / "ct_tsne.png").stat().st_size > 2000
    assert "NMI" in capsys.readouterr().out

    rc = main(
        [
            "cluster",
            "--checkpoint",
            str(tmp_path / "model"),
            "--image",
            str(phantom / "ct.nii.gz"),
            "--labels",
            str(tmp_path / "missing.nii.gz"),
            "--out",
            str(tmp_path / "o2"),
            "--spacing",
            "5",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "missing.nii.gz" in err


def test_cluster_command_takes_a_pooled_token_model(phantom, tmp_path):
    """Clustering needs token features only: the SMIT-like ablation (no semantic attention) clusters too."""
    torch.manual_seed(0)
    SMARTFormer.from_preset("tiny", semantic_attention=False).save_pretrained(tmp_path / "model")
    assert run_cluster(tmp_path / "model", phantom, tmp_path / "out") == 0
    assert 0 <= json.loads((tmp_path / "out" / "ct_clustering.json").read_text())["nmi"] <= 1


def test_legend_styles_stay_distinct():
    """29 organs (the TotalSegmentator example) once shared colours (spleen and kidney_right the same blue)."""
    styles = [C.distinct_style(n) for n in range(100)]
    assert len(set(styles)) == 100
    assert len({colour for colour, _ in styles[:10]}) == 10


def test_cluster_finds_names_a_folder_up_and_warns_without_any(phantom, tmp_path):
    import shutil

    torch.manual_seed(0)
    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path / "model")
    case = tmp_path / "organs" / "case_a"
    case.mkdir(parents=True)
    for name in ("ct.nii.gz", "labels.nii.gz"):
        shutil.copy(phantom / name, case / name)

    def cluster(out: str) -> dict:
        assert run_cluster(tmp_path / "model", case, tmp_path / out, "--tsne-points", "50") == 0
        return json.loads((tmp_path / out / "ct_clustering.json").read_text())

    with pytest.warns(UserWarning, match="no labels.json"):
        assert all(name.startswith("label ") for name in cluster("bare")["tokens_per_label"])
    shutil.copy(phantom / "labels.json", tmp_path / "organs" / "labels.json")  # the data set's shared names
    assert set(cluster("named")["tokens_per_label"]) <= set(LABELS.values())
