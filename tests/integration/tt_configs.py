"""Stock-TerraTorch-format configs and the rasters they read, written by the tests (kinds modelled on
IBM/terratorch tests/resources/configs: GenericNonGeo* and multimodal datamodules, every model factory,
single / list / weighted-dict losses, optimizer + lr_scheduler blocks, trainer sections with callbacks)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import yaml

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
S2_BANDS = ["BLUE", "GREEN", "RED", "NIR_BROAD", "SWIR_1", "SWIR_2"]  # TerraMind's names of Sentinel-2 B2-B12
SIZE = 32


def write_tiles(root: Path, kind: str, n_train: int = 8, n_val: int = 4, bands: int = 6, seed: int = 0,
                name: str = "img") -> Path:
    """<root>/{train,val}/{<name>,label}/tile_<i>_{<name>,label}.tif; labels: 2 classes (kind segmentation,
    class = bright pixels) or a float target (regression)."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in (name, "label"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.normal(1000, 300, (bands, SIZE, SIZE)).astype(np.float32)
            signal = img[:3].mean(0)
            if kind == "segmentation":
                label = (signal > 1000).astype(np.int16)[None]
                ltype = "int16"
            else:
                label = ((signal - 1000) / 300).astype(np.float32)[None]
                ltype = "float32"
            profile = dict(driver="GTiff", height=SIZE, width=SIZE, crs="EPSG:4326",
                           transform=from_origin(0, 0, 1e-4, 1e-4))
            with rasterio.open(root / split / name / f"tile_{i}_{name}.tif", "w", count=bands, dtype="float32",
                               **profile) as f:
                f.write(img)
            with rasterio.open(root / split / "label" / f"tile_{i}_label.tif", "w", count=1, dtype=ltype,
                               **profile) as f:
                f.write(label)
    return root


TRAINER = {  # what stock configs carry; only max_steps/log/clip change what is trained here
    "accelerator": "auto", "strategy": "auto", "devices": "auto", "num_nodes": 1, "max_steps": 4,
    "log_every_n_steps": 1, "check_val_every_n_epoch": 1, "enable_checkpointing": True,
    "logger": {"class_path": "TensorBoardLogger", "init_args": {"save_dir": "tt_logs", "name": "x"}},
    "callbacks": [{"class_path": "RichProgressBar"},
                  {"class_path": "LearningRateMonitor", "init_args": {"logging_interval": "epoch"}},
                  {"class_path": "EarlyStopping", "init_args": {"monitor": "val/loss", "patience": 100}}],
}
MEANS, STDS = [1000.0] * 6, [300.0] * 6


def pixelwise_data(root: Path, kind: str, batch_size: int = 2) -> dict:
    cls = "GenericNonGeoSegmentationDataModule" if kind == "segmentation" else \
        "GenericNonGeoPixelwiseRegressionDataModule"
    init = {"batch_size": batch_size, "num_workers": 0,
            "train_data_root": str(root / "train/img"), "train_label_data_root": str(root / "train/label"),
            "val_data_root": str(root / "val/img"), "val_label_data_root": str(root / "val/label"),
            "test_data_root": str(root / "val/img"), "test_label_data_root": str(root / "val/label"),
            "img_grep": "*_img.tif", "label_grep": "*_label.tif", "dataset_bands": BANDS, "output_bands": BANDS,
            "means": MEANS, "stds": STDS, "no_label_replace": -1, "no_data_replace": 0,
            "train_transform": [{"class_path": "ToTensorV2"}]}
    if kind == "segmentation":
        init["num_classes"] = 2
    return {"class_path": cls, "init_args": init}


def multimodal_data(root: Path, batch_size: int = 2) -> dict:
    """GenericMultiModalDataModule with two modalities (S2L2A: 6 bands, S1GRD: 2 bands)."""
    mods = ["S2L2A", "S1GRD"]
    init = {"task": "segmentation", "batch_size": batch_size, "num_workers": 0, "modalities": mods,
            "train_data_root": {m: str(root / "train" / m) for m in mods},
            "train_label_data_root": str(root / "train/label"),
            "val_data_root": {m: str(root / "val" / m) for m in mods},
            "val_label_data_root": str(root / "val/label"),
            "test_data_root": {m: str(root / "val" / m) for m in mods},
            "test_label_data_root": str(root / "val/label"),
            "image_grep": {m: f"*_{m}.tif" for m in mods}, "label_grep": "*_label.tif",
            "means": {"S2L2A": MEANS, "S1GRD": [1000.0, 1000.0]},
            "stds": {"S2L2A": STDS, "S1GRD": [300.0, 300.0]},
            "num_classes": 2, "no_label_replace": -1, "no_data_replace": 0}  # default transforms: to tensor
    return {"class_path": "GenericMultiModalDataModule", "init_args": init}


def write_multimodal(root: Path) -> Path:
    write_tiles(root, "segmentation", bands=6, name="S2L2A")
    write_tiles(root, "segmentation", bands=2, name="S1GRD", seed=0)  # same labels (same seed), 2 bands
    return root


PRITHVI_NECKS = [{"name": "SelectIndices", "indices": [0, 1, 2, 3]}, {"name": "ReshapeTokensToImage"},
                 {"name": "LearnedInterpolateToPyramidal"}]


def model(kind: str, factory: str, model_args: dict, loss="ce", **init) -> dict:
    task = "SemanticSegmentationTask" if kind == "segmentation" else "PixelwiseRegressionTask"
    args = {"model_factory": factory, "model_args": model_args, "loss": loss, "ignore_index": -1, **init}
    if kind == "regression":
        args.pop("ignore_index")
    return {"class_path": f"terratorch.tasks.{task}", "init_args": args}


def _seg_args(**kw) -> dict:
    return {"num_classes": 2, **kw}


# name -> (kind, model section builder, data kind). Every config trains in the tests (first-batch equivalence).
def configs() -> dict[str, tuple[str, dict, str]]:
    tiny_prithvi = {"backbone": "prithvi_eo_tiny", "backbone_pretrained": False, "backbone_bands": BANDS,
                    "backbone_img_size": SIZE, "necks": PRITHVI_NECKS, "decoder": "UNetDecoder",
                    "decoder_channels": [32, 16, 8, 4]}
    return {
        "prithvi_factory_rmse": ("regression", model(
            "regression", "PrithviModelFactory",
            {"backbone": "prithvi_eo_tiny", "pretrained": False, "bands": BANDS, "in_channels": 6, "num_frames": 1,
             "backbone_img_size": SIZE, "decoder": "FCNDecoder", "decoder_channels": 32,
             "head_dropout": 0.1, "head_final_act": "torch.nn.ReLU", "head_learned_upscale_layers": 2},
            loss="rmse"), "pixelwise"),
        "encdec_prithvi_ce_weights": ("segmentation", model(
            "segmentation", "EncoderDecoderFactory", _seg_args(**tiny_prithvi), loss="ce",
            class_weights=[0.3, 0.7]), "pixelwise"),
        "encdec_prithvi_list_ce_lovasz": ("segmentation", model(
            "segmentation", "EncoderDecoderFactory", _seg_args(**tiny_prithvi), loss=["ce", "lovasz"]), "pixelwise"),
        # TerraTorch's documented aux head form (examples/confs/sen1floods11_vit.yaml): plain dicts in the task's
        # aux_heads, weighted by aux_loss; the loss is the decode head's plus 0.4 x the aux head's
        "encdec_prithvi_aux_ce": ("segmentation", model(
            "segmentation", "EncoderDecoderFactory", _seg_args(**tiny_prithvi), loss="ce",
            aux_heads=[{"name": "aux_head", "decoder": "FCNDecoder",
                        "decoder_args": {"decoder_channels": 16, "decoder_in_index": -1, "decoder_num_convs": 2,
                                         "head_dropout": 0.1}}],
            aux_loss={"aux_head": 0.4}), "pixelwise"),
        # the class_path form, on a regression task (1.2.11 types its aux_heads list[AuxiliaryHead])
        "prithvi_factory_aux_rmse": ("regression", model(
            "regression", "PrithviModelFactory",
            {"backbone": "prithvi_eo_tiny", "pretrained": False, "bands": BANDS, "in_channels": 6, "num_frames": 1,
             "backbone_img_size": SIZE, "decoder": "FCNDecoder", "decoder_channels": 32},
            loss="rmse", aux_heads=[{"class_path": "terratorch.models.model.AuxiliaryHead", "init_args": {
                "name": "aux_fcn", "decoder": "FCNDecoder", "decoder_args": {"decoder_channels": 16}}}],
            aux_loss={"aux_fcn": 0.5}), "pixelwise"),
        "encdec_terramind_dice": ("segmentation", model(
            "segmentation", "EncoderDecoderFactory", _seg_args(
                backbone="terramind_v1_tiny", backbone_pretrained=False, backbone_modalities=["S2L2A"],
                backbone_bands={"S2L2A": S2_BANDS},
                backbone_img_size=SIZE, necks=[{"name": "SelectIndices", "indices": [2, 5, 8, 11]},
                                               {"name": "ReshapeTokensToImage", "remove_cls_token": False},
                                               {"name": "LearnedInterpolateToPyramidal"}],
                decoder="UNetDecoder", decoder_channels=[32, 16, 8, 4]), loss="dice"), "pixelwise_s2"),
        "encdec_timm_resnet_jaccard": ("segmentation", model(
            "segmentation", "EncoderDecoderFactory", _seg_args(
                backbone="timm_resnet18", backbone_pretrained=False, backbone_in_chans=6,
                decoder="FCNDecoder", decoder_channels=32),
            loss="jaccard", ignore_index=None), "pixelwise"),  # smp's Jaccard takes no ignore_index
        "generic_unet_weighted_mse": ("regression", model(
            "regression", "GenericUnetModelFactory",
            # TerraTorch's own test config says backbone_base_channels (1.2.11's UNet refuses it) and an ASPP
            # head, which the 1.2.11 wrapper feeds a tensor where the head indexes a list: the UNet's own
            # full-resolution output (out_channels: 1) is the prediction
            {"backbone": "UNet", "backbone_in_channels": 6, "backbone_out_channels": 1, "in_channels": 6},
            loss={"rmse": 0.5, "mse": 0.5}), "pixelwise"),
        "smp_unet_ce": ("segmentation", model(
            "segmentation", "SMPModelFactory", _seg_args(
                backbone="resnet18", model="Unet", bands=BANDS, in_channels=6, pretrained=False)), "pixelwise"),
        "multimodal_terramind_ce": ("segmentation", model(
            "segmentation", "EncoderDecoderFactory", _seg_args(
                backbone="terramind_v1_tiny", backbone_pretrained=False, backbone_modalities=["S2L2A", "S1GRD"],
                backbone_bands={"S2L2A": S2_BANDS},
                backbone_img_size=SIZE, necks=[{"name": "SelectIndices", "indices": [2, 5, 8, 11]},
                                               {"name": "ReshapeTokensToImage", "remove_cls_token": False},
                                               {"name": "LearnedInterpolateToPyramidal"}],
                decoder="UNetDecoder", decoder_channels=[32, 16, 8, 4])), "multimodal"),
    }


def write_config(tmp: Path, name: str, data_root: Path, **extra) -> Path:
    kind, model_section, data_kind = configs()[name]
    if data_kind == "multimodal":
        data = multimodal_data(data_root)
    else:
        data = pixelwise_data(data_root, kind)
        if data_kind == "pixelwise_s2":  # TerraMind reads S2L2A band names
            data["init_args"]["dataset_bands"] = data["init_args"]["output_bands"] = \
                S2_BANDS
    cfg = {"seed_everything": 7, "trainer": copy.deepcopy(TRAINER), "data": data, "model": model_section,
           "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.05}},
           "lr_scheduler": {"class_path": "ReduceLROnPlateau", "init_args": {"monitor": "val/loss"}}}
    for k, v in extra.items():
        cfg[k] = v
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
