"""The shipped offline scorer (pipeline/assets/pf-tiny-scorer.pt, built by
scripts/build_scorer.py): open_clip's own loader takes it, and it tells a
product photo's class from a wrong one on Fashion-MNIST *test* photos (the
corpus only holds the training split), captioned in the demo's templates."""

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pairforge.demo import FASHION_TEMPLATES, SCORER_CHECKPOINT
from pairforge.pipeline.datasets import FASHION_CLASSES, fashion_mnist
from pairforge.trainer.evaluate import roc_auc
from pairforge.trainer.model import register_configs


@pytest.fixture(scope="module")
def scorer():
    import open_clip

    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms("pf-tiny", pretrained=str(SCORER_CHECKPOINT))
    return model.eval(), preprocess, open_clip.get_tokenizer("pf-tiny")


def test_scorer_is_small_and_says_how_it_was_made():
    assert SCORER_CHECKPOINT.stat().st_size < 10e6
    figures = json.loads(SCORER_CHECKPOINT.with_suffix(".json").read_text())
    assert figures["model"] == "pf-tiny" and figures["open_clip_check"]["all"]["auc"] >= 0.95
    state = torch.load(SCORER_CHECKPOINT, map_location="cpu", weights_only=True)
    assert "optimizer" not in state and state["state_dict"]["logit_scale"].dtype == torch.float16


def test_scorer_tells_the_right_product_class_from_a_wrong_one(scorer):
    model, preprocess, tok = scorer
    rng = random.Random(7)
    images, labels = fashion_mnist("t10k", 1300)
    ims, own, other = [], [], []
    for arr, lab in zip(images[1000:], labels[1000:]):  # not the demo's first 240 either
        buf = io.BytesIO()
        Image.fromarray(255 - arr).resize((112, 112), Image.BICUBIC).convert("RGB").save(buf, "JPEG", quality=90)
        ims.append(preprocess(Image.open(buf)))
        cls = FASHION_CLASSES[lab]
        template = rng.choice(FASHION_TEMPLATES)
        own.append(template.format(c=cls))
        other.append(template.format(c=rng.choice([c for c in FASHION_CLASSES if c not in cls and cls not in c])))
    with torch.no_grad():
        img = model.encode_image(torch.stack(ims), normalize=True)
        pos = (img * model.encode_text(tok(own), normalize=True)).sum(-1).numpy()
        neg = (img * model.encode_text(tok(other), normalize=True)).sum(-1).numpy()
    assert roc_auc(pos, neg) > 0.9
    assert np.mean(pos > neg) > 0.85
