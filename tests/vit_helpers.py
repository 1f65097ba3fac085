"""Helpers for the EoMT / DINOv3 tests."""
from __future__ import annotations

import torch


def make_confident(eomt, no_object_bias: float) -> None:
    """Random EoMT weights give near-uniform classes (below panoptic's 0.8) and almost flat masks: scale the class
    head and the last mask layer so some queries are sure of a class and their masks have edges. `no_object_bias`
    sets how many queries still say "no object"."""
    with torch.no_grad():
        eomt.class_predictor.weight.mul_(40.0)
        eomt.class_predictor.bias.zero_()
        eomt.class_predictor.bias[-1] = no_object_bias
        eomt.mask_head.fc3.weight.mul_(300.0)
        eomt.mask_head.fc3.bias.mul_(300.0)


TINY_NAMES = {0: "person", 1: "car", 2: "sky", 3: "road"}  # sky and road are the stuff classes


def tiny_vit_artifacts(root) -> dict:
    """A tiny confident EoMT (exported with and without its thing/stuff split) and a tiny DINOv3, written by
    transformers under `root` and exported to ONNX: {"eomt", "eomt_nostuff", "dino"} -> artifact path."""
    import transformers

    from deimv2_deploy.exporters.vit_export import export_vit

    torch.manual_seed(5)
    config = transformers.EomtDinov3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=1,
                                           num_blocks=1, num_queries=12, num_labels=4, id2label=TINY_NAMES)
    model = transformers.EomtDinov3ForUniversalSegmentation(config).eval()
    model.attn_mask_probs.fill_(0.0)
    make_confident(model, no_object_bias=12.0)  # instances pass a threshold, panoptic keeps segments
    model.save_pretrained(root / "eomt")
    dino = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, num_register_tokens=1)).eval()
    dino.save_pretrained(root / "dino")
    return {"eomt": export_vit("eomt", root / "eomt", output_dir=root, stuff_classes="sky,road", quiet=True).path,
            "eomt_nostuff": export_vit("eomt", root / "eomt", output_dir=root / "ns", quiet=True).path,
            "dino": export_vit("dinov3", root / "dino", output_dir=root, quiet=True).path}
