"""The pipeline's hyperparameter defaults are its models' own: one home per default."""

from assets.models import ALSConfig, Item2VecConfig, ItemItemConfig
from training.models.als import ALSModel
from training.models.base import default_params
from training.models.item2vec import Item2VecModel
from training.models.itemknn import EASEModel, ItemKNNModel


def test_each_config_default_is_the_model_constructors() -> None:
    pairs = [
        (ALSConfig(), ALSModel, {n: n for n in ("factors", "regularization", "alpha", "bm25")}),
        (Item2VecConfig(), Item2VecModel, {n: n for n in ("vector_size", "window", "epochs")}),
        (ItemItemConfig(), EASEModel, {"ease_l2": "l2", "ease_max_items": "max_items"}),
        (ItemItemConfig(), ItemKNNModel, {"neighbors": "neighbors"}),
    ]
    for config, model, fields in pairs:
        defaults = default_params(model)
        for config_field, model_param in fields.items():
            assert getattr(config, config_field) == defaults[model_param], (model, model_param)
    assert ALSModel().regularization == ALSConfig().regularization == 20.0
