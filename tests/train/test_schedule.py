"""The learning-rate schedule runs on torch's LambdaLR: warmup then cosine, as TrainConfig says,
and its state survives a checkpoint."""

import math

import torch

from sparseroute.train.config import TrainConfig
from sparseroute.train.loop import _restore_schedule, make_optimizer, make_scheduler


def _setup(tc):
    model = torch.nn.Linear(4, 4)
    opt = make_optimizer(model, tc)
    return model, opt, make_scheduler(opt, tc)


def test_the_scheduler_sets_the_configured_rate_at_every_step():
    tc = TrainConfig(tokens=64 * 100, batch_size=4, seq_len=16, lr=1e-2, warmup_fraction=0.1, min_lr_ratio=0.2)
    model, opt, sched = _setup(tc)
    rates = []
    for _ in range(tc.steps):
        rates.append(opt.param_groups[0]["lr"])
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    assert rates == [tc.lr_at(s) for s in range(tc.steps)]
    assert rates[0] == tc.lr / 10 and max(rates) == tc.lr  # 10 warmup steps up to the peak
    assert math.isclose(rates[-1], tc.lr * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 89 / 90))))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # the cosine only decays


def test_resumed_schedule_continues_exactly():
    tc = TrainConfig(tokens=64 * 50, batch_size=4, seq_len=16, lr=3e-3)
    model, opt, sched = _setup(tc)
    for _ in range(17):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    state, groups = sched.state_dict(), opt.state_dict()
    model2, opt2, sched2 = _setup(tc)
    opt2.load_state_dict(groups)
    _restore_schedule(sched2, {"step": 17, "state": {"scheduler": state}}, tc)
    # and a checkpoint without the scheduler's state (written before it existed) gives the same rate
    model3, opt3, sched3 = _setup(tc)
    _restore_schedule(sched3, {"step": 17, "state": {}}, tc)
    for _ in range(5):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == opt3.param_groups[0]["lr"]
        for o, s, m in ((opt, sched, model), (opt2, sched2, model2), (opt3, sched3, model3)):
            m(torch.randn(2, 4)).sum().backward()
            o.step()
            s.step()
