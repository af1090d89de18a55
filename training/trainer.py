"""The training loop behind `detdeploy train`: RTMDet on a COCO-format dataset (rotated RTMDet
on oriented boxes: its data, loss and evaluation come from `training.rotated_data`,
`models.rotated_rtmdet.loss` and `evaluation.rotated_eval`).

One process, or several under `torchrun` (DDP: gloo on CPU, NCCL on GPU, DistributedSampler;
only rank 0 evaluates and writes). Each epoch ends with `last.pth` (EMA weights as the
`state_dict`, MMDetection-style, plus the full training state for `--resume`); evaluations
keep `best.pth`; `log.jsonl` and `curves.png` follow the run. Instance models (RTMDet-Ins) train
on masks too and validate with segm AP as well (`instance.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from detdeploy.core.errors import CheckpointError, DetdeployError
from detdeploy.core.fileio import atomic_write
from detdeploy.models import LoadedDetector, build_model, get_spec, save_checkpoint
from detdeploy.models.checkpoint import check_state_dict, load_checkpoint_file, read_checkpoint
from detdeploy.models.rtmdet.loss import RTMDetLoss

from .data import AugmentConfig, CocoDetectionDataset, collate, read_coco
from .ema import ExpMomentumEMA
from .instance import evaluate_instance, is_instance_model, make_instance_loss, selection_metric
from .schedule import make_optimizer, make_scheduler

LAST, BEST, LOG, CURVES = 'last.pth', 'best.pth', 'log.jsonl', 'curves.png'


@dataclass(frozen=True)
class TrainConfig:
    model: str
    train_ann: str
    train_images: str
    out: str
    val_ann: str | None = None
    val_images: str | None = None
    epochs: int = 12
    batch: int = 8                      # per process
    img_size: int = 320
    lr: float = 0.004 * 8 / 256         # MMDetection's 0.004 at 256 images, scaled per image
    weight_decay: float = 0.05
    warmup_iters: int = 1000
    val_interval: int = 1               # epochs between evaluations
    workers: int = 0
    seed: int = 0
    mosaic_prob: float = 0.0
    mixup_prob: float = 0.0
    scale_range: tuple[float, float] = (0.5, 2.0)   # random resize around the fitting scale
    ema_momentum: float = 0.0002
    init_checkpoint: str | None = None
    max_iters_per_epoch: int | None = None      # for quick checks: truncate every epoch
    log_interval: int = 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), if any."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return DistInfo(device=torch.device('cuda' if torch.cuda.is_available() else 'cpu'))
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl')
        return DistInfo(rank, world_size, torch.device('cuda', local_rank))
    dist.init_process_group('gloo')
    return DistInfo(rank, world_size, torch.device('cpu'))


def _load_init(model: torch.nn.Module, path: str) -> list[str]:
    """Initial weights; classifier layers whose class count differs are left as initialised.
    A checkpoint none of whose tensors fit, or with integer tensors for float parameters, is
    refused (it would silently train from scratch or from nonsense)."""
    state_dict, _ = read_checkpoint(path)
    own = model.state_dict()
    mistyped = [k for k, v in state_dict.items()
                if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if mistyped:
        raise CheckpointError(f'--checkpoint {path}: {mistyped[0]} is '
                              f'{str(state_dict[mistyped[0]].dtype).split(".")[-1]}, not floating '
                              f'point ({len(mistyped)} such tensors)')
    aliases = shared_names(own)
    usable = {k: v for k, v in state_dict.items()
              if k in own and own[k].shape == v.shape and k not in aliases}
    if not usable:
        raise CheckpointError(f'--checkpoint {path}: none of its {len(state_dict)} tensors fits '
                              f'{type(model).__name__} (e.g. {next(iter(state_dict))})')
    skipped = sorted(set(own) - set(usable) - aliases)
    model.load_state_dict(usable, strict=False)
    return skipped


def shared_names(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Keys naming a tensor that a later key names too, so that the last name's checkpoint
    value is the one taken, on purpose rather than by load order. RTMDet-Ins's `reg_convs` are
    its `cls_convs`: from an RTMDet checkpoint the shared tower takes the box tower's weights
    (measured on the shapes set: first-step cls/box losses 2.6/0.81 against 20.4/1.37 with the
    class tower's)."""
    last: dict[tuple, str] = {}
    earlier = set()
    for key, value in state_dict.items():
        if value.numel() == 0:
            continue
        identity = (value.data_ptr(), value.dtype, tuple(value.shape))
        if identity in last:
            earlier.add(last[identity])
        last[identity] = key
    return earlier


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, show_progress: bool = True,
                 echo=print):
        self.config = config
        self.echo = echo
        self.show_progress = show_progress
        self.dist = setup_distributed()
        self.out = Path(config.out)
        if config.epochs < 1 or config.batch < 1:
            raise DetdeployError('--epochs and --batch must be positive')
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        self.rotated = get_spec(config.model).model_class.task == 'rotated'
        self.instance = is_instance_model(get_spec(config.model).model_class)
        if self.rotated:
            from .rotated_data import read_rotated_coco
            self.train_set = read_rotated_coco(config.train_ann, config.train_images)
        else:
            self.train_set = read_coco(config.train_ann, config.train_images,
                                       with_masks=self.instance)
        if not self.train_set.files:
            raise DetdeployError(f'{config.train_ann} has no images')
        self.class_names = self.train_set.class_names
        base = get_spec(config.model)
        self.spec = dataclasses.replace(base, preprocessing=base.preprocessing.with_input_size(
            (config.img_size, config.img_size), '--img-size'), class_names=self.class_names)
        torch.manual_seed(config.seed)
        self.model = build_model(self.spec.name, num_classes=len(self.class_names)).train()
        if config.init_checkpoint and not resume:
            skipped = _load_init(self.model, config.init_checkpoint)
            if skipped and self.dist.is_main:
                self.echo(f'note: {len(skipped)} tensors not taken from {config.init_checkpoint} '
                          f'(absent or shape differs), e.g. {skipped[0]}')
        # channels-last convolutions are about twice as fast on CPU for this network
        self.model.to(self.dist.device, memory_format=torch.channels_last)
        self.ema = ExpMomentumEMA(self.model, momentum=config.ema_momentum)
        if self.rotated:
            from detdeploy.models.rotated_rtmdet.loss import RotatedRTMDetLoss
            self.loss = RotatedRTMDetLoss(self.model.strides)
        else:
            self.loss = make_instance_loss(self.model) if self.instance else RTMDetLoss(
                self.model.strides)

        augment = AugmentConfig(img_size=config.img_size, mosaic_prob=config.mosaic_prob,
                                mixup_prob=config.mixup_prob,
                                scale_range=tuple(config.scale_range))
        dataset_class = CocoDetectionDataset
        if self.rotated:
            from .rotated_data import RotatedDetectionDataset as dataset_class
        self.dataset = dataset_class(self.train_set, augment, self.spec.preprocessing,
                                     seed=config.seed)
        per_step = config.batch * self.dist.world_size
        self.iters_per_epoch = len(self.dataset) // per_step
        if self.iters_per_epoch == 0:
            raise DetdeployError(f'{len(self.dataset)} training images are fewer than one batch '
                                 f'({per_step})')
        if config.max_iters_per_epoch:
            self.iters_per_epoch = min(self.iters_per_epoch, config.max_iters_per_epoch)
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, self.iters_per_epoch, config.epochs,
                                        config.warmup_iters)
        self.train_model = self.model
        if self.dist.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.device.index] if self.dist.device.type == 'cuda'
                else None)
        self.epoch = 0                  # epochs completed
        self.iteration = 0
        self.best_ap = -1.0
        self.history: list[dict] = []
        self.epochs_changed: tuple[int, int] | None = None
        if resume:
            self._resume()
            if self.epochs_changed:
                self._log({'epoch': self.epoch, 'iter': self.iteration,
                           'epochs_changed': list(self.epochs_changed)})

    # --- state -------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {'epoch': self.epoch, 'iter': self.iteration, 'best_ap': self.best_ap,
                'train_config': self.config.to_dict()}

    def _save(self, name: str) -> None:
        state = {'model': self.model.state_dict(), 'ema': self.ema.state_dict(),
                 'optimizer': self.optimizer.state_dict(),
                 'scheduler': self.scheduler.state_dict(),
                 'torch_rng': torch.get_rng_state()}
        save_checkpoint(self.out / name, self.ema.module.state_dict(), self.spec,
                        self.class_names, extra_meta={'detdeploy_train': self._meta()},
                        extra={'train_state': state})

    def _resume(self) -> None:
        path = self.out / LAST
        if not path.is_file():
            raise DetdeployError(f'--resume: {path} does not exist (start without --resume)')
        checkpoint = load_checkpoint_file(path)
        meta = checkpoint.get('meta')
        state = checkpoint.get('train_state')
        meta = meta.get('detdeploy_train') if isinstance(meta, dict) else None
        if not isinstance(state, dict) or not isinstance(meta, dict):
            raise DetdeployError(f'--resume: {path} holds no training state')
        missing = ({'model', 'ema', 'optimizer', 'scheduler', 'torch_rng'} - set(state)) or (
            {'epoch', 'iter', 'best_ap', 'train_config'} - set(meta))
        if missing or not isinstance(meta['train_config'], dict):
            raise DetdeployError(f'--resume: {path} has incomplete training state (no '
                                 f'{", ".join(sorted(missing)) or "train_config"})')
        saved = meta['train_config']
        for key in ('model', 'img_size', 'batch', 'seed', 'lr'):
            if saved.get(key) != getattr(self.config, key):
                raise DetdeployError(f'--resume: --{key.replace("_", "-")} {getattr(self.config, key)}'
                                     f' differs from the run in {self.out} ({saved[key]})')
        if saved.get('epochs') != self.config.epochs:
            # A run may be shortened or extended: the flat-then-cosine decay is recomputed for
            # the new length from the current step on (earlier steps are not revisited).
            if self.config.epochs <= meta['epoch']:
                raise DetdeployError(f'--resume: --epochs {self.config.epochs}, but the run in '
                                     f'{self.out} has already done {meta["epoch"]} epochs')
            if self.dist.is_main:
                self.echo(f'note: --epochs {self.config.epochs} (the run was started with '
                          f'{saved["epochs"]}): the learning-rate decay is recomputed for '
                          f'{self.config.epochs} epochs from epoch {meta["epoch"] + 1} on')
            self.epochs_changed = (saved['epochs'], self.config.epochs)
        try:
            check_state_dict(state['model'], path)
            self.model.load_state_dict(state['model'])
            self.ema.load_state_dict(state['ema'])
            self.optimizer.load_state_dict(state['optimizer'])
            self.scheduler.load_state_dict(state['scheduler'])
            torch.set_rng_state(state['torch_rng'])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            text = ' '.join(str(exc).split())
            raise DetdeployError(f'--resume: {path} does not fit this run: '
                                 f'{type(exc).__name__}: {text[:300]}') from None
        self.epoch, self.iteration = meta['epoch'], meta['iter']
        self.best_ap = meta['best_ap']
        log = self.out / LOG
        if log.is_file():
            self.history = [json.loads(line) for line in log.read_text().splitlines() if line]
            self.history = [row for row in self.history if row.get('epoch', 0) <= self.epoch]

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.dist.is_main:
            with atomic_write(self.out / LOG, 'w') as handle:
                handle.writelines(json.dumps(r) + '\n' for r in self.history)

    # --- loop --------------------------------------------------------------------------------
    def _loader(self, epoch: int):
        self.dataset.set_epoch(epoch)
        if self.dist.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.dataset, self.dist.world_size, self.dist.rank, shuffle=True,
                seed=self.config.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
            sampler = torch.randperm(len(self.dataset), generator=generator).tolist()
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.config.batch, sampler=sampler, drop_last=True,
            num_workers=self.config.workers, collate_fn=collate)

    def train_step(self, images, boxes, labels, masks=None) -> dict[str, float]:
        device = self.dist.device
        raw = self.train_model(images.to(device, memory_format=torch.channels_last))
        targets = [[b.to(device) for b in boxes], [lab.to(device) for lab in labels]]
        if masks is not None:
            targets.append([m.to(device) for m in masks])
        losses = self.loss(raw, *targets)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.iteration += 1
        return {'loss': float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}

    def train_epoch(self) -> dict[str, float]:
        from tqdm import tqdm
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        start = time.perf_counter()
        loader = self._loader(self.epoch)
        bar = tqdm(total=self.iters_per_epoch, disable=not (self.show_progress and self.dist.is_main),
                   desc=f'epoch {self.epoch + 1}/{self.config.epochs}', unit='it', leave=False)
        for step, batch in enumerate(loader):
            if step >= self.iters_per_epoch:
                break
            lr = self.optimizer.param_groups[0]['lr']
            losses = self.train_step(*batch)
            count += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{losses['loss']:.3f}", cls=f"{losses['loss_cls']:.3f}",
                            box=f"{losses['loss_bbox']:.3f}", lr=f'{lr:.2e}',
                            **({'mask': f"{losses['loss_mask']:.3f}"} if self.instance else {}))
            bar.update(1)
            if self.iteration % self.config.log_interval == 0:
                self._log({'epoch': self.epoch + 1, 'iter': self.iteration, 'lr': lr, **losses})
        bar.close()
        self.epoch += 1
        means = {k: v / max(count, 1) for k, v in sums.items()}
        means['seconds'] = time.perf_counter() - start
        return means

    def evaluate(self) -> dict[str, float]:
        from detdeploy.evaluation.coco_eval import evaluate
        from detdeploy.runtimes.torch_backend import TorchBackend
        if self.instance:
            return evaluate_instance(self.ema.module.eval(), self.spec, self.config.val_ann,
                                     self.config.val_images, self.dist.device)
        detector = LoadedDetector(self.ema.module.eval(), self.spec, self.class_names, 'EMA')
        backend = TorchBackend(detector, nms=detector.spec.nms('eval'),
                               device=str(self.dist.device))
        if self.rotated:        # AP50, AP75, AP: DOTA-style rotated mAP
            from detdeploy.evaluation.rotated_eval import evaluate_rotated as evaluate
        result = evaluate(backend, self.config.val_ann, self.config.val_images, batch_size=8)
        return result.metrics

    def fit(self) -> dict:
        """Train the remaining epochs; returns the last epoch's summary."""
        summary: dict = {}
        has_val = bool(self.config.val_ann and self.config.val_images)
        while self.epoch < self.config.epochs:
            losses = self.train_epoch()
            summary = {'epoch': self.epoch, 'iter': self.iteration, **losses}
            evaluate_now = has_val and (self.epoch % self.config.val_interval == 0
                                        or self.epoch == self.config.epochs)
            if self.dist.is_main:
                if evaluate_now:
                    metrics = self.evaluate()
                    summary['val'] = metrics
                    if selection_metric(metrics) > self.best_ap:
                        self.best_ap = selection_metric(metrics)
                        self._save(BEST)
                        summary['best'] = True
                self._log({'epoch': self.epoch, 'iter': self.iteration, 'summary': summary})
                self._save(LAST)
                if not has_val:
                    self._save(BEST)
                write_curves(self.history, self.out / CURVES)
                self.echo(format_summary(summary, self.config.epochs))
            if self.dist.world_size > 1:
                dist.barrier()
        if self.dist.world_size > 1:
            dist.destroy_process_group()
        return summary


def format_summary(summary: dict, epochs: int) -> str:
    mask = f", mask {summary['loss_mask']:.4f}" if 'loss_mask' in summary else ''
    text = (f"epoch {summary['epoch']}/{epochs}: loss {summary['loss']:.4f} "
            f"(cls {summary['loss_cls']:.4f}, bbox {summary['loss_bbox']:.4f}{mask}), "
            f"{summary['seconds']:.0f} s")
    if 'val' in summary:
        val = summary['val']
        text += f", val AP {val['AP']:.3f} AP50 {val['AP50']:.3f}"
        if 'segm_AP' in val:
            text += f", segm AP {val['segm_AP']:.3f} AP50 {val['segm_AP50']:.3f}"
        text += ' (best)' if summary.get('best') else ''
    return text


def write_curves(history: list[dict], path: Path) -> None:
    """Loss per logged iteration and val AP per epoch, as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = [r for r in history if 'loss' in r]
    evals = [r for r in history if 'summary' in r and 'val' in r['summary']]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ('loss', 'loss_cls', 'loss_bbox', 'loss_mask'):
        if any(key in r for r in steps):
            left.plot([r['iter'] for r in steps if key in r], [r[key] for r in steps if key in r],
                      label=key)
    left.set_xlabel('iteration')
    left.set_title('training loss')
    left.legend()
    for key in ('AP', 'AP50', 'AP75', 'segm_AP'):
        if not all(key in r['summary']['val'] for r in evals):
            continue
        right.plot([r['epoch'] for r in evals], [r['summary']['val'][key] for r in evals],
                   marker='o', label=key)
    right.set_xlabel('epoch')
    right.set_title('val mAP (EMA weights)')
    right.legend()
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format='png', dpi=80)
    plt.close(figure)
