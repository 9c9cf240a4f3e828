"""The Flax model zoo: ResNets, BERT, and PyTorch-named checkpoint conversion."""
from cram_jax.models.bert import (BERT_PRUNABLE, BertConfig, BertForQuestionAnswering,
                                  BertForSequenceClassification, BertModel, BertOutput)
from cram_jax.models.convert import (PRETRAINING_HEADS, bert_abstract_params, export_bert,
                                     export_torchvision_resnet, import_bert,
                                     import_torchvision_resnet, load_bert, save_bert)
from cram_jax.models.resnet import (RESNET_PRUNABLE, RESNET_UNIFORM, BasicBlock, Bottleneck,
                                    CifarResNet18, ResNet, ResNet18, ResNet20, ResNet32,
                                    ResNet8, ResNet34, ResNet44, ResNet50, ResNet56, ResNet101,
                                    ResNet110, ResNet152)
