"Keep-best rotation in a real fit: a bounded disk on a long fit, the best saves kept, and strategy='best' averaging exactly them"
import pytest
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.manifest import Manifest
from ckpt_avg.demo import digits_learner
from helpers import Capture, fit, state, states_equal, mean_of, folder


def test_ten_epochs_keep_2_newest_and_3_best_and_average_the_best(tmp_path):
    learn = digits_learner(path=tmp_path)
    cap, avg = Capture(), AverageLast(3, strategy='best', report=False)
    fit(learn, 10, [SaveEvery(epochs=1, keep=2, keep_best=3), cap, avg], lr=0.3)
    m = Manifest(folder(learn))
    loss = {e['file']: e['metrics']['valid_loss'] for e in m.checkpoints}  # removed entries keep their record
    assert len(loss) == 10
    best = sorted(loss, key=loss.get)[:3]
    newest = [e['file'] for e in m.checkpoints[-2:]]
    assert set(best) - set(newest), "the 3 best are all among the 2 newest: this fit does not tell keep-best from keep"
    live = [e['file'] for e in m.live()]
    assert len(live) <= 5 and set(best) <= set(live) and set(newest) <= set(live)
    assert sorted(p.name for p in folder(learn).glob('ckpt_f*_s*.pth')) == sorted(live)  # files on disk: exactly the live ones
    for e in m.live():
        want = ' and '.join(w for w, on in (('newest', e['file'] in newest), ('best valid_loss', e['file'] in best)) if on)
        assert e['kept'] == want, (e['file'], e['kept'], want)
    assert [e['file'] for e in avg.entries] == sorted(best)  # save order
    assert m.averages[-1]['inputs'] == sorted(best)
    states = [s for s, e in zip(cap.states, m.checkpoints) if e['file'] in best]
    assert states_equal(state(learn.model), mean_of(states))


def test_higher_is_better_metric_and_the_options_refused_before_training(tmp_path):
    learn = digits_learner(path=tmp_path)
    fit(learn, 4, [SaveEvery(epochs=1, keep=1, keep_best=1, monitor='accuracy')], lr=0.3)
    m = Manifest(folder(learn))
    acc = [e['metrics']['accuracy'] for e in m.checkpoints]
    best = m.checkpoints[max(range(4), key=lambda i: (acc[i], -i))]['file']  # ties: the older
    assert {e['file'] for e in m.live()} == {best, m.checkpoints[-1]['file']}
    with pytest.raises(ValueError, match='add epochs='): SaveEvery(batches=5, keep=2, keep_best=3)
    with pytest.raises(ValueError, match='pass keep= too'): SaveEvery(epochs=1, keep_best=3)
    with pytest.raises(ValueError, match="monitor='f1'"): fit(learn, 1, [SaveEvery(epochs=1, keep=1, keep_best=1, monitor='f1')])
    with pytest.raises(ValueError, match='pass keep_best>=4'):
        fit(learn, 1, [SaveEvery(epochs=1, keep=2, keep_best=3, fname='b'), AverageLast(4, fname='b', strategy='best')])
    with pytest.raises(ValueError, match='keep=2 would delete'):
        fit(learn, 1, [SaveEvery(epochs=1, keep=2, keep_best=3, fname='c'), AverageLast(3, fname='c')])
