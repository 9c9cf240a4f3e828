"""CIFAR ResNet-18 on CIFAR-10, CrAM+-k95 (docs/method.md section 7).

  --config experiments/configs/resnet18_cifar10.py[:cram+-k95 | sgd]

CrAM+ at global sparsity 0.95, rho 0.2, SGD momentum 0.9, lr 0.1, wd 5e-4, batch 128,
180 epochs, no warm-up, cosine per epoch, seed 10.
"""

from experiments.configs import common


def get_config(method: str = "cram+-k95"):
  c = common.base_config()
  c.dataset, c.model, c.num_classes = "cifar10", "CifarResNet18", 10
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.1, 5e-4
  c.batch_size = 128
  c.num_epochs, c.warmup_epochs = 180, 0
  c.cram.rho = 0.2
  common.set_method(c, method)
  c.checkpoint_every_steps = 390 * 5
  return c
