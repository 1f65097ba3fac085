"""Training pieces that are not the model: data pipeline, matcher, criterion, optimiser groups, schedule, EMA,
recipe. The data pipeline lives in its own modules (augment_recipe, transforms, mosaic, collate, dataset).

    from deimv2_deploy.training import build_criterion, build_optimizer, FlatCosineSchedule, ModelEMA, get_recipe

    recipe = get_recipe("atto").scaled(epochs=60, iters_per_epoch=len(loader))
    criterion = build_criterion("atto", num_classes=K, recipe=recipe)
    optimizer = build_optimizer(model, recipe)
    schedule = FlatCosineSchedule.from_recipe(optimizer, recipe, iters_per_epoch=len(loader))
    ema = ModelEMA(model, decay=recipe.ema_decay, warmups=recipe.ema_warmups)
"""
from deimv2_deploy.training.criterion import DEIMCriterion, build_criterion
from deimv2_deploy.training.ema import ModelEMA
from deimv2_deploy.training.matcher import HungarianMatcher
from deimv2_deploy.training.optim import FlatCosineSchedule, build_optimizer, flat_cosine_lr, param_groups
from deimv2_deploy.training.recipe import RECIPE_NAMES, RECIPES, ParamGroupRule, TrainRecipe, get_recipe

__all__ = [
    "build_criterion",
    "DEIMCriterion",
    "HungarianMatcher",
    "build_optimizer",
    "param_groups",
    "FlatCosineSchedule",
    "flat_cosine_lr",
    "ModelEMA",
    "TrainRecipe",
    "ParamGroupRule",
    "RECIPES",
    "RECIPE_NAMES",
    "get_recipe",
]
