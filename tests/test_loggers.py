"""AverageLast's report reaches fastai's loggers in a real fit: TensorBoard's event files (read with tensorboard's
EventAccumulator) and W&B in offline mode (the run's summary and the artifact, read from the offline run's files)"""
import json, struct, time
from pathlib import Path
import pytest
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.demo import digits_learner
from helpers import fit


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip('tensorboard')
    from fastai.callback.tensorboard import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(3)
    fit(learn, 4, [SaveEvery(epochs=1), avg, TensorBoardCallback(log_dir=tmp_path/'tb', trace_model=False, log_preds=False)])
    ea = EventAccumulator(str(tmp_path/'tb')); ea.Reload()
    assert 'valid_loss' in ea.Tags()['scalars']  # fastai's own, per epoch
    for row in ('final', 'average'):
        for name in ('valid_loss', 'accuracy'):
            (ev,) = ea.Scalars(f'ckpt_avg/{row}/{name}')
            assert ev.step == learn.train_iter and ev.value == pytest.approx(avg.results[row][name], rel=1e-6)


def wandb_records(run_file:Path):
    "The records of a W&B transaction log (`run-*.wandb`: a 7-byte header, then 32 KiB blocks of records split into pieces)"
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, piece = run_file.read_bytes(), 7, b''
    assert data[:4] == b':W&B'
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7: pos += 32768 - pos % 32768; continue  # a block's tail too short for a header is padding
        _, n, kind = struct.unpack('<IHB', data[pos:pos+7])
        piece, pos = piece + data[pos+7:pos+7+n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record(); r.ParseFromString(piece); piece = b''
            yield r

def test_wandb_summary_and_artifact_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip('wandb')
    for k, v in dict(WANDB_MODE='offline', WANDB_DIR=tmp_path, WANDB_SILENT='true', WANDB_DATA_DIR=tmp_path/'data',
                     WANDB_CACHE_DIR=tmp_path/'cache', WANDB_CONFIG_DIR=tmp_path/'config').items(): monkeypatch.setenv(k, str(v))
    from fastai.callback.wandb import WandbCallback
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(3, log_artifact=True)
    run = wandb.init(project='ckpt_avg-tests')
    try: fit(learn, 4, [SaveEvery(epochs=1), avg, WandbCallback(log_preds=False)])
    finally: wandb.finish()
    (run_file,) = (tmp_path/'wandb').glob('offline-run-*/run-*.wandb')
    for _ in range(600):  # wandb.finish() can return before wandb's service has written the run's last records
        try: records = list(wandb_records(run_file))
        except Exception: records = []  # its last record only partly written
        if records and records[-1].WhichOneof('record_type') == 'exit': break
        time.sleep(0.1)
    summary, artifacts = {}, []
    for r in records:
        if r.WhichOneof('record_type') == 'summary':
            summary.update({u.key or '/'.join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
        if r.WhichOneof('record_type') == 'artifact': artifacts.append(r.artifact)
    summary_file = run_file.parent/'files'/'wandb-summary.json'  # written by some wandb versions, not by 0.31 offline
    if summary_file.exists(): summary.update(json.loads(summary_file.read_text()))
    for row in ('final', 'average'):
        assert summary[f'ckpt_avg/{row}/valid_loss'] == pytest.approx(avg.results[row]['valid_loss'], rel=1e-6)
    (art,) = [a for a in artifacts if a.name == avg.saved_path.stem]
    assert art.type == 'model' and json.loads(art.metadata)['report'] == json.loads(json.dumps(avg.results))
    assert [e.path for e in art.manifest.contents] == [avg.saved_path.name]
