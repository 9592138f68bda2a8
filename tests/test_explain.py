"""Explanations on a briefly trained planted-lesion model (anisotropic source volumes).

One small model is trained once per module (~10 s on one thread); every test reuses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.errors import ExplanationError, UnsafePathError
from medfusion.explain import (
    deletion_auc,
    explain_prediction,
    modality_shapley,
    random_deletion_auc,
    randomization_check,
    role_cam,
    write_explanation,
)
from medfusion.explain.attribution import clinical_attributions, variable_of
from medfusion.explain.benchmark import (
    lesion_cohort,
    peak_world,
    saliency_hits,
    study_inputs,
    train_lesion_model,
)
from medfusion.explain.occlusion import mask_voxels, role_occlusion
from medfusion.types import Explanation, Volume

GRID = (24, 24, 24)


@pytest.fixture(scope="module")
def trained():
    train = lesion_cohort(64, seed=0, grid=GRID)
    test = lesion_cohort(16, seed=1, grid=GRID)
    net = train_lesion_model(train, epochs=15)
    return net, test


def _prob(net, images, clinical, present) -> float:
    with torch.no_grad():
        return float(torch.softmax(net(images, clinical, present).logits, 1)[0, 1])


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "occlusion"])
def test_saliency_peak_on_the_lesion_in_world_coordinates(trained, method: str) -> None:
    net, test = trained
    distances = saliency_hits(net, test, method=method)
    assert len(distances) == 8
    # "on the lesion": the peak voxel centre lies within the sphere (radius 4.5 mm) plus
    # one source voxel diagonal's half (the map is sampled at voxel centres)
    on_lesion = [d <= 0.5 * float(np.linalg.norm([1.0, 1.0, 2.5])) for d in distances]
    assert sum(on_lesion) >= 6, distances


def test_model_parameter_randomization_changes_the_map(trained) -> None:
    net, test = trained
    positives = [s for s in test if s.label == 1][:4]
    correlations = []
    for s in positives:
        images, clinical, present = study_inputs(s)
        correlations.append(randomization_check(
            lambda n, i=images, c=clinical, p=present: role_cam(n, "ct", i, c, p, 1)[0], net))
    assert np.mean(correlations) < 0.5, correlations


def test_occlusion_changes_when_the_model_does(trained) -> None:
    """Model randomisation (Adebayo et al.): occlusion explains the model, not the input."""
    net, test = trained
    correlations = []
    for s in [s for s in test if s.label == 1][:3]:
        images, clinical, present = study_inputs(s)
        correlations.append(randomization_check(
            lambda n, i=images, c=clinical, p=present: role_occlusion(n, "ct", i, c, p, 1)[0],
            net))
    assert np.mean(correlations) < 0.5, correlations


def test_deletion_curve_beats_a_random_map(trained) -> None:
    net, test = trained
    wins = []
    for s in [s for s in test if s.label == 1][:5]:
        images, clinical, present = study_inputs(s)
        cam = role_cam(net, "ct", images, clinical, present, 1)[0]

        def prob_fn(batch: np.ndarray, c=clinical) -> np.ndarray:
            x = torch.from_numpy(batch.astype(np.float32))[:, None]
            k = x.shape[0]
            with torch.no_grad():
                out = net({"ct": x}, c.expand(k, -1), torch.ones(k, 2, dtype=torch.bool))
            return torch.softmax(out.logits, 1)[:, 1].numpy()

        image = s.tensor[0]
        wins.append((deletion_auc(prob_fn, image, cam), random_deletion_auc(prob_fn, image)))
    cam_auc, random_auc = np.asarray(wins).T
    # deleting the most salient voxels first lowers p(lesion) faster than random deletion
    assert cam_auc.mean() < random_auc.mean() - 0.03, wins
    assert (cam_auc <= random_auc).sum() >= 3, wins


def test_hooks_are_removed_and_bad_requests_refused(trained) -> None:
    net, test = trained
    images, clinical, present = study_inputs(test[1])
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    for training in (False, True):
        net.train(training)
        role_cam(net, "ct", images, clinical, present, 1, "gradcampp")
        # MONAI restores the *wrapper's* mode: a fresh wrapper is in training mode and
        # would flip the network into training (BatchNorm updates, dropout) if not guarded
        assert all(m.training == training for m in net.modules())
    net.eval()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in buffers.items())
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    # the single-input wrapper Grad-CAM sees is exactly the fusion network
    from medfusion.explain.gradcam import RoleForward

    with torch.no_grad():
        wrapped = RoleForward(net, "ct", images, clinical, present)(images["ct"])
        assert torch.equal(wrapped, net(images, clinical, present).logits)
    with pytest.raises(ExplanationError):
        role_cam(net, "mr", images, clinical, present, 1)
    with pytest.raises(ExplanationError):
        role_cam(net, "ct", images, clinical, present, 5)
    with pytest.raises(ExplanationError):
        role_cam(net, "ct", images, clinical, present, 1, method="lime")
    with pytest.raises(ExplanationError):
        role_cam(net, "ct", images, clinical, torch.tensor([[False, True]]), 1)


def test_occlusion_credits_exactly_the_region_the_output_reads() -> None:
    """MONAI's occlusion under this torch: a network whose class-1 logit reads only one
    box of the input gets its map's peak inside that box and nothing far from it."""
    from monai.visualize import OcclusionSensitivity

    class ReadsOneBox(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            evidence = x[:, 0, 10:14, 4:8, 16:20].mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(evidence), 4.0 * evidence], dim=1)

    x = torch.zeros(1, 1, 24, 24, 24)
    x[0, 0, 10:14, 4:8, 16:20] = 1.0
    occ = OcclusionSensitivity(ReadsOneBox(), mask_size=4, n_batch=64, verbose=False,
                               mode="mean_img", overlap=0.5)
    with torch.no_grad():
        full = torch.softmax(ReadsOneBox()(x), 1)[0, 1]
        occluded, _ = occ(x)
    drop = (full - occluded[0, 1]).numpy()
    peak = np.unravel_index(int(np.argmax(drop)), drop.shape)
    assert 9 <= peak[0] <= 14 and 3 <= peak[1] <= 8 and 15 <= peak[2] <= 20, peak
    assert abs(drop[0:4, 16:24, 0:8]).max() < 1e-6  # far from the box: no credit


def test_occlusion_box_and_refusals(trained) -> None:
    assert mask_voxels((32, 32, 32)) == (6, 6, 6)
    assert mask_voxels((256, 256, 1)) == (51, 51, 1)  # a radiograph: never along depth
    net, test = trained
    images, clinical, present = study_inputs(test[1])
    flags = [m.training for m in net.modules()]
    cam = role_occlusion(net, "ct", images, clinical, present, 1)
    assert cam.shape == (1, *GRID) and 0.0 <= cam.min() and cam.max() <= 1.0
    assert [m.training for m in net.modules()] == flags
    with pytest.raises(ExplanationError):
        role_occlusion(net, "mr", images, clinical, present, 1)
    with pytest.raises(ExplanationError):
        role_occlusion(net, "ct", images, clinical, present, 5)


def test_shapley_is_exact_and_efficient(trained) -> None:
    net, test = trained
    s = next(s for s in test if s.label == 1)
    images, clinical, present = study_inputs(s)
    with torch.no_grad():
        emb = net.encode(images, clinical, present)
    phi = modality_shapley(net, emb, present, 1, base_rate=0.5)
    assert set(phi) == {"ct", "clinical"}
    full = _prob(net, images, clinical, present)
    ct_only = _prob(net, images, None, torch.tensor([[True, False]]))
    clin_only = _prob(net, {}, clinical, torch.tensor([[False, True]]))
    # two players: closed form
    assert phi["ct"] == pytest.approx(0.5 * (ct_only - 0.5) + 0.5 * (full - clin_only), abs=1e-6)
    assert sum(phi.values()) == pytest.approx(full - 0.5, abs=1e-6)
    # an absent modality is not a player
    only_ct = modality_shapley(net, emb, torch.tensor([[True, False]]), 1, base_rate=0.5)
    assert set(only_ct) == {"ct"} and only_ct["ct"] == pytest.approx(ct_only - 0.5, abs=1e-6)


def test_clinical_integrated_gradients_complete_and_grouped(trained) -> None:
    net, test = trained
    s = test[3]
    images, clinical, present = study_inputs(s)
    with torch.no_grad():
        emb = net.encode(images, clinical, present)
    attr = clinical_attributions(net, emb, present, clinical, 1, ["crp", "crp_missing"],
                                 variables=["crp"], n_steps=64)
    assert set(attr) == {"crp"}
    p_x = _prob(net, images, clinical, present)
    p_0 = _prob(net, images, torch.zeros_like(clinical), present)
    assert attr["crp"] == pytest.approx(p_x - p_0, abs=2e-3)
    assert variable_of("sex=F", ["sex", "age"]) == "sex"
    assert variable_of("age_missing", ["sex", "age"]) == "age"


def _permuted(volume: Volume) -> Volume:
    """The same image stored with axes (k, i, j): a different source grid, same world."""
    perm = (2, 0, 1)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3][:, list(perm)]
    return Volume(array=np.ascontiguousarray(np.transpose(volume.array, perm)),
                  affine=affine, modality=volume.modality)


def test_explain_prediction_and_export_read_back(trained, tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    sitk = pytest.importorskip("SimpleITK")
    fm = pytest.importorskip("medfusion.inference")
    from medfusion.preprocess import RoleSpec, prepare_volume, to_tensor_input

    net, test = trained
    s = next(s for s in test if s.label == 1)
    source = _permuted(s.source)
    prepared = prepare_volume(source, RoleSpec(grid=GRID, normalization="none"), role="ct")
    inputs = fm.PreparedInputs(
        study_key="st-0123abcd", modalities=("ct", "clinical"),
        tensors={"ct": to_tensor_input(prepared)}, present=np.array([True, True]),
        clinical=s.clinical, prepared={"ct": prepared}, sources={"ct": source},
    )
    card = {"labels": ["normal", "lesion"], "net": net.config.to_dict(),
            "role_specs": {"ct": RoleSpec(grid=GRID, normalization="none").to_dict()},
            "members": [{"prefix": "m0."}],
            "training": {"splits": {"train": {"labels": {"normal": 30, "lesion": 10}}}}}
    model = fm.FusionModel.from_parts(card, {f"m0.{k}": v for k, v in net.state_dict().items()})
    explanation = explain_prediction(model, inputs, target=1)
    assert isinstance(explanation, Explanation)
    sal = explanation.saliency["ct"]
    assert sal.shape == source.shape and np.array_equal(sal.affine, source.affine)
    assert 0.0 <= sal.array.min() and sal.array.max() == pytest.approx(1.0)
    # peak on the lesion, measured in world mm on the permuted grid
    assert np.linalg.norm(peak_world(sal) - np.asarray(s.lesion_world)) <= s.radius_mm + 1.5
    # Shapley efficiency against the card's base rate (10 / 40)
    assert sum(explanation.shapley.values()) == pytest.approx(
        _prob(net, *study_inputs(s)) - 0.25, abs=1e-4)
    assert set(explanation.modality_weights) == {"ct", "clinical"}

    written = write_explanation(explanation, tmp_path, "st-0123abcd",
                                images={"ct": source})
    nii, png = tmp_path / "st-0123abcd" / "ct.nii.gz", tmp_path / "st-0123abcd" / "ct.png"
    assert set(written.values()) == {nii, png} and png.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "st-0123abcd").iterdir()) == ["ct.nii.gz", "ct.png"]
    img = nib.load(str(nii))
    np.testing.assert_array_equal(np.asarray(img.dataobj), sal.array)
    np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and img.header["descrip"].item() == b""
    # SimpleITK: LPS world, array in (k, j, i) order
    itk = sitk.ReadImage(str(nii))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), sal.array)
    direction = np.asarray(itk.GetDirection()).reshape(3, 3)
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = direction * np.asarray(itk.GetSpacing())
    lps_affine[:3, 3] = itk.GetOrigin()
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ lps_affine, source.affine, atol=1e-4)


def test_write_explanation_refuses_unsafe_names(tmp_path: Path) -> None:
    vol = Volume(array=np.zeros((4, 4, 4), np.float32), affine=np.eye(4))
    for bad in ("../escape", "a/b", "..", "", "ZZTEST^SENTINEL"):
        with pytest.raises(UnsafePathError):
            write_explanation(Explanation(saliency={"ct": vol}), tmp_path, bad)
    with pytest.raises(UnsafePathError):
        write_explanation(Explanation(saliency={"../ct": vol}), tmp_path, "st-1")
    assert list(tmp_path.iterdir()) == []


def test_xray_role_saliency_round_trip(tmp_path: Path) -> None:
    """A 2D (X-ray, K = 1) role: Grad-CAM on the 2D encoder, back onto the radiograph grid."""
    nib = pytest.importorskip("nibabel")
    from medfusion.explain.export import saliency_to_source
    from medfusion.models.net import FusionNet, NetConfig, RoleNetConfig
    from medfusion.preprocess import RoleSpec, prepare_volume, to_tensor_input

    torch.manual_seed(0)
    net = FusionNet(NetConfig(roles={"xray": RoleNetConfig(spatial_dims=2, grid=(32, 32, 1))},
                              n_classes=2, embed_dim=8)).eval()
    rng = np.random.default_rng(0)
    affine = np.diag([-0.6, -0.6, 1.0, 1.0])
    source = Volume(array=rng.random((40, 48, 1), dtype=np.float32), affine=affine,
                    modality="DX")
    prepared = prepare_volume(source, RoleSpec(grid=(32, 32, 1), normalization="none"),
                              role="xray")
    x = torch.from_numpy(to_tensor_input(prepared))[None]
    for method in ("gradcam", "gradcampp"):
        cam = role_cam(net, "xray", {"xray": x}, None, torch.ones(1, 1, dtype=torch.bool), 1,
                       method)
        assert cam.shape == (1, 32, 32, 1)
    mapped = saliency_to_source(cam[0], prepared, source)
    assert mapped.shape == (40, 48, 1) and np.array_equal(mapped.affine, affine)
    write_explanation(Explanation(saliency={"xray": mapped}), tmp_path, "st-x",
                      images={"xray": source})
    back = nib.load(str(tmp_path / "st-x" / "xray.nii.gz"))
    assert back.shape == (40, 48, 1)
    np.testing.assert_allclose(back.affine, affine)
    # one 2D panel in the radiograph's aspect (40 x 48 pixels of 0.6 mm), not 1-pixel strips
    import matplotlib.image as mpimg

    assert mpimg.imread(str(tmp_path / "st-x" / "xray.png")).shape[:2] == (512, 427)
