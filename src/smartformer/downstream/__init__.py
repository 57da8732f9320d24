"""Downstream evaluation of pretrained encoders on labelled CT: lesion (or scan) classification.

* :mod:`~smartformer.downstream.cases`: the case CSV and the crops around lesions,
* :mod:`~smartformer.downstream.features`: frozen [CLS] / pooled features,
* :mod:`~smartformer.downstream.splits`: patient-level stratified folds and label fractions,
* :mod:`~smartformer.downstream.metrics`: metrics, bootstrap intervals and ROC curves,
* :mod:`~smartformer.downstream.probe` and :mod:`~smartformer.downstream.finetune`: the two classifiers.

The commands ``smartformer features``, ``probe`` and ``finetune`` drive them.
"""
