"""The Flax model zoo: ResNets, BERT, and PyTorch-named checkpoint conversion.

The models and the converters need only the base dependencies; reading and
writing checkpoint files (`load_bert`, `save_bert`) needs the `models` extra
(`pip install 'cram_jax[models]'`, for safetensors), imported on first use.
"""

from cram_jax.models.bert import (
    BERT_PRUNABLE,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    BertOutput,
)
from cram_jax.models.convert import (
    PRETRAINING_HEADS,
    bert_abstract_params,
    export_bert,
    export_torchvision_resnet,
    import_bert,
    import_torchvision_resnet,
    load_bert,
    save_bert,
)
from cram_jax.models.nnx_bridge import LinenModule, as_nnx
from cram_jax.models.resnet import (
    RESNET_NM,
    RESNET_PRUNABLE,
    RESNET_UNIFORM,
    BasicBlock,
    Bottleneck,
    CifarResNet18,
    ResNet,
    ResNet8,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet44,
    ResNet50,
    ResNet56,
    ResNet101,
    ResNet110,
    ResNet152,
)

__all__ = [
    "BERT_PRUNABLE",
    "BasicBlock",
    "BertConfig",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
    "Bottleneck",
    "CifarResNet18",
    "LinenModule",
    "PRETRAINING_HEADS",
    "RESNET_NM",
    "RESNET_PRUNABLE",
    "RESNET_UNIFORM",
    "ResNet",
    "ResNet101",
    "ResNet110",
    "ResNet152",
    "ResNet18",
    "ResNet20",
    "ResNet32",
    "ResNet34",
    "ResNet44",
    "ResNet50",
    "ResNet56",
    "ResNet8",
    "as_nnx",
    "bert_abstract_params",
    "export_bert",
    "export_torchvision_resnet",
    "import_bert",
    "import_torchvision_resnet",
    "load_bert",
    "save_bert",
]
