"""The metrics that need local weights: CLIPScore and LPIPS on tiny random models saved to a folder, and the
"not available offline" report without one."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sd_tiny, for its CLIP vocabulary

from lungsynth.config import get_config  # noqa: E402
from lungsynth.eval.pretrained_metrics import (NOT_OFFLINE, AlexLpips, available_metrics, clip_score,  # noqa: E402
                                               lpips_distance, pretrained_metrics)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from sd_tiny import _clip_vocab
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=77)
    config = CLIPConfig(text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                                     "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 77,
                                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                     "pad_token_id": tokenizer.pad_token_id},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_is_w_times_the_clipped_cosine(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["The nodule is round in shape, solid internally, with well-defined margins.", "a", "b c"]
    score = clip_score(images, prompts, tiny_clip)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        inputs = processor(text=prompts, images=list(images.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()),
                           return_tensors="pt", padding=True, do_rescale=False)
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert score == pytest.approx(float((2.5 * cos.clamp(min=0)).mean()), abs=1e-5)
    assert clip_score(images, prompts, tiny_clip, batch_size=2) == pytest.approx(score, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_lpips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    net = AlexLpips()
    torch.save({f"features.{k}": v for k, v in net.features.state_dict().items()}, folder / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(AlexLpips.CHANNELS)},
               folder / "alex.pth")
    return folder


def test_lpips_is_zero_for_the_same_image_and_grows_with_the_difference(tiny_lpips):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 64, 64, generator=g)
    near = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    far = torch.rand(4, 1, 64, 64, generator=g)
    assert lpips_distance(a, a, tiny_lpips) == pytest.approx(0.0, abs=1e-7)
    assert 0 < lpips_distance(a, near, tiny_lpips) < lpips_distance(a, far, tiny_lpips)
    assert lpips_distance(a, far, tiny_lpips) == pytest.approx(lpips_distance(far, a, tiny_lpips), rel=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        lpips_distance(a, far[:2], tiny_lpips)
    (tiny_lpips / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing alexnet.pth, alex.pth"):
        lpips_distance(a, a, tiny_lpips / "empty")


def test_without_weights_each_metric_says_it_is_not_available(tiny_clip, tiny_lpips):
    cfg = get_config("smoke")
    images = torch.rand(2, 1, 32, 32)
    out = pretrained_metrics(cfg, images, ["a", "b"], images)
    assert set(out) == {"lpips", "clip_score", "bioclip_score"}
    assert all(isinstance(v, str) and v.startswith(NOT_OFFLINE) for v in out.values())
    local = get_config("smoke", {"evaluation.clip_dir": str(tiny_clip), "evaluation.lpips_dir": str(tiny_lpips),
                                 "evaluation.biomedclip_dir": str(tiny_clip)})
    out = pretrained_metrics(local, images, ["a", "b"], images)
    assert out["lpips"] == pytest.approx(0.0, abs=1e-7) and 0 <= out["clip_score"] <= 2.5
    assert available_metrics(local)["bioclip_score"].startswith("not available: ")
