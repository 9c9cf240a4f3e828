"""BERT on SQuAD v1.1 with AdamW, dense or CrAM+ (docs/method.md section 7: settings not public).

  --config experiments/configs/bert_squad.py[:adamw | cram+-multi] \
      --config.init_checkpoint=/path/bert-base-uncased/model.safetensors \
      --config.data_options.vocab_file=/path/bert-base-uncased/vocab.txt

Our choices, documented: the usual BERT-base SQuAD fine-tuning recipe (AdamW lr 5e-5,
betas (0.9, 0.999), eps 1e-8, wd 0.01 on kernels/embeddings, batch 32, 2 epochs,
10% linear warm-up then cosine, per step; max_seq_length 384, doc_stride 128,
max_query_length 64). CrAM+-Multi compresses the encoder's dense kernels
(BERT_PRUNABLE) at a sparsity sampled from {.5,.6,.7,.8} per step with rho 0.005
(Adam-scale gradients are small; rho is in weight units because CrAM does not
normalise). One-shot evaluation then sweeps 50-95% and 2:4 / 4:8.
"""

import ml_collections

from experiments.configs import common


def get_config(method: str = "cram+-multi"):
  c = common.base_config()
  c.task, c.dataset = "squad", "squad/v1.1"
  c.train_split, c.eval_split = "train", "validation"
  c.bert = ml_collections.ConfigDict(
      {"size": "base", "overrides": ml_collections.ConfigDict()}
  )
  c.data_options = ml_collections.ConfigDict(
      {
          "vocab_file": "vocab.txt",
          "lowercase": True,
          "max_seq_length": 384,
          "doc_stride": 128,
          "max_query_length": 64,
      }
  )
  c.optimizer.base = "adamw"
  c.optimizer.learning_rate, c.optimizer.weight_decay = 5e-5, 0.01
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.batch_size, c.eval_batch_size = 32, 64
  c.num_epochs, c.warmup_epochs, c.schedule_per_epoch = 2, 0.2, False
  c.cram.rho, c.cram.sparsities = 0.005, (0.5, 0.6, 0.7, 0.8)
  common.set_method(c, method)
  c.checkpoint_every_steps = 1000
  return c
