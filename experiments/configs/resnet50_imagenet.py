"""ResNet-50 on ImageNet (docs/method.md section 7).

  --config experiments/configs/resnet50_imagenet.py[:cram+-multi | cram+-nm | sgd]

cram+-multi: sparsities {.5,.7,.9}; cram+-nm: 2:4 or 4:8 per step (the RGB stem stays
dense). rho 0.05, SGD momentum 0.9, lr 0.2, wd 1e-4, batch 512, 100 epochs, 5 warm-up
epochs, cosine per epoch, seed 10. bfloat16 compute (params float32).
"""

from experiments.configs import common


def get_config(method: str = "cram+-multi"):
  c = common.base_config()
  c.dataset, c.model, c.num_classes = "imagenet2012", "ResNet50", 1000
  c.train_split, c.eval_split = "train", "validation"
  c.dtype = "bfloat16"
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.2, 1e-4
  c.batch_size, c.eval_batch_size = 512, 512
  c.num_epochs, c.warmup_epochs = 100, 5
  c.cram.rho, c.cram.sparsities = 0.05, (0.5, 0.7, 0.9)
  common.set_method(c, method)
  c.checkpoint_every_steps = 2500
  c.data_threads = 16
  c.prefetch = 4
  return c
