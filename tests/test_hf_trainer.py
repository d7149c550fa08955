"""A CoE trained by transformers.Trainer through CoEWithLoss (a few CPU steps), and the plain loop beside it."""

import pytest
import torch
from _hf import bert_classifier, bert_encoder, pad, sentences
from transformers import Trainer, TrainingArguments

from pycoe import BalancedTransportWeighter, CoE, CoELoss, Delegator, ExpertPool, LabelGenerator
from pycoe.coe import CoEWithLoss

K = 2


class Sentences(torch.utils.data.Dataset):
    """Dicts of input_ids, attention_mask and labels, all padded to one length (default_data_collator stacks them)."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids, self.mask = pad(sentences(n, gen), 10)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _model() -> CoEWithLoss:
    torch.manual_seed(0)
    coe = CoE(Delegator(bert_encoder(), K, num_classes=3), ExpertPool.from_template(bert_classifier(), K))
    return CoEWithLoss(coe, CoELoss(BalancedTransportWeighter(K), LabelGenerator()))


def _args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        logging_steps=1,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def test_trainer_trains_and_evaluates_a_coe(tmp_path):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Sentences(12, 0), eval_dataset=Sentences(8, 1))
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("model.experts.experts.1.") for n in changed)
    assert any(n.startswith("model.delegator.selection_head") for n in changed)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    predictions = trainer.predict(Sentences(8, 1))
    assert predictions.predictions.shape == (8, 3)
    # the eval loss is the task loss of the routed predictions
    model.eval()
    data = Sentences(8, 1)
    with torch.no_grad():
        out = model.model(input_ids=data.ids, attention_mask=data.mask)
        expected = torch.nn.functional.cross_entropy(out.output, data.labels)
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_a_plain_loop_with_the_same_module(tmp_path):
    model = _model().train()
    data = Sentences(8, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {"input_ids": data.ids, "attention_mask": data.mask, "labels": data.labels}
    out = model(**batch)
    out["loss"].backward()
    optimizer.step()
    assert set(out) == {"loss", "info"} and "agreement" in out["info"]
    assert set(model.eval()(**batch)) == {"loss", "logits"}
    assert set(model(input_ids=data.ids, attention_mask=data.mask)) == {"logits"}


def test_errors(tmp_path):
    model = _model()
    data = Sentences(4, 0)
    with pytest.raises(TypeError, match=r"received labels but no model input.*remove_unused_columns=False"):
        model(labels=data.labels)
    with pytest.raises(ValueError, match="CoEWithLoss needs labels in training"):
        model.train()(input_ids=data.ids, attention_mask=data.mask)
    with pytest.raises(TypeError, match="model must be a pycoe CoE"):
        CoEWithLoss(bert_classifier(), model.criterion)
    with pytest.raises(TypeError, match="criterion must be a pycoe CoELoss"):
        CoEWithLoss(model.model, torch.nn.CrossEntropyLoss())
    # the Trainer's default remove_unused_columns=True drops every column forward's signature does not name
    trainer = Trainer(model=model, args=_args(tmp_path, remove_unused_columns=True), train_dataset=Sentences(8, 0))
    with pytest.raises(TypeError, match="remove_unused_columns=False"):
        trainer.train()
