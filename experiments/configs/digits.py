"""ResNet-8 on the bundled digits (offline; the demo's recipe).

  --config experiments/configs/digits.py[:sgd | sam | cram+-multi | gmp-90 | acdc-90]

8x8 images, 1437 train / 360 test; batch 64, 30 epochs, lr 0.05, wd 5e-4,
cosine per epoch; CrAM+-Multi {.5,.7,.8,.9} with rho 0.05; SAM rho 0.05. The one-shot
sweep: 50/70/80/90/95% global and layer-wise magnitude, 2:4 and 4:8, BatchNorm
re-estimated on 1000 training images (the recipe's 100 batches of 128); the fields
of OBS and SparseGPT that experiments/compare.py switches on.
Baselines (gmp-NN, acdc-NN; docs/baselines.md): GMP prunes every epoch from
epoch 2 to 20 on the cubic schedule, then fine-tunes 10 epochs with fixed
masks; AC/DC has 3 dense epochs, then compressed/dense phases of 3 epochs,
and compresses the last 9.
"""

from experiments.configs import common


def get_config(method: str = "cram+-multi"):
  c = common.base_config()
  c.dataset, c.model, c.num_classes = "digits", "ResNet8", 10
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.05, 5e-4
  c.batch_size, c.eval_batch_size = 64, 120
  c.num_epochs, c.warmup_epochs = 30, 0
  c.sam.rho = c.cram.rho = 0.05
  c.cram.sparsities = (0.5, 0.7, 0.8, 0.9)
  c.gmp.begin_epoch, c.gmp.end_epoch, c.gmp.frequency_epochs = 2.0, 20.0, 1.0
  c.acdc.warmup_epochs, c.acdc.phase_epochs = 3.0, 3.0
  c.acdc.final_epochs = 9.0
  common.set_method(c, method)
  c.checkpoint_every_steps = 200
  c.log_every_steps = 22
  c.seed = 0
  c.oneshot.sparsities = (0.5, 0.7, 0.8, 0.9, 0.95)
  # The demo prunes by magnitude only; experiments/compare.py adds OBS,
  # SparseGPT and int8/int4 (see experiments/oneshot.py for the fields).
  c.oneshot.pruners = ("magnitude",)
  c.oneshot.quantizers = ()
  c.oneshot.quantize_methods = ("rtn",)  # and/or "gptq"
  c.oneshot.obs_gradients = 64  # m: gradients in the empirical Fisher
  c.oneshot.obs_batch_size = 16  # training images per gradient
  c.oneshot.obs_block_size = 128
  c.oneshot.obs_damp = 1e-3  # relative to the Fisher's mean diagonal
  c.oneshot.sparsegpt_batches = 8  # of bn_batch_size images, for Hessians
  c.oneshot.sparsegpt_block_size = 128
  return c
