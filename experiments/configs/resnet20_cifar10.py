"""ResNet-20 on CIFAR-10 (docs/method.md section 7).

  --config experiments/configs/resnet20_cifar10.py:sgd | sam | cram+-multi | cram+-multi-high

cram+-multi: sparsities {.3,...,.9}, rho 0.2; cram+-multi-high: {.5,.7,.8,.9,.95}, rho 0.15.
All: SGD momentum 0.9, lr 0.1, wd 5e-4, batch 128, 200 epochs, 5 warm-up epochs,
cosine stepped per epoch, seed 10. SAM uses rho 0.05 (SAM's own CIFAR setting; the
CrAM paper does not give one for ResNet-20).
"""

from experiments.configs import common

METHODS = ("sgd", "sam", "cram+-multi", "cram+-multi-high")


def get_config(method: str = "cram+-multi"):
  if method not in METHODS:
    raise ValueError(
        f"resnet20_cifar10: method {method!r} is not one of {METHODS}"
    )
  c = common.base_config()
  c.dataset, c.model, c.num_classes = "cifar10", "ResNet20", 10
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.1, 5e-4
  c.batch_size = 128
  c.num_epochs, c.warmup_epochs = 200, 5
  c.sam.rho = 0.05
  c.cram.rho, c.cram.sparsities = 0.2, (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  # cram+-multi-high's preset sets its own levels and rho 0.15.
  common.set_method(c, method)
  c.checkpoint_every_steps = 390 * 5  # every 5 epochs
  return c
