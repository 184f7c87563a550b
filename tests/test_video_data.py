"""Video files and video datasets: reading clips with PyAV, writing MP4/GIF, folders with metadata.jsonl, HF video
columns, clip transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import VIDEO_FRAMES, VIDEO_SIZE, video_frame
from nar_diffusers.training.batches import TokenBatchCollator, TrainingBatchEncoder
from nar_diffusers.training.video_data import VideoClipTransform, VideoExamples, encode_label_column, load_video_dataset
from nar_diffusers.utils.video_utils import (
    clip_indices,
    count_frames,
    read_clip,
    read_frames,
    video_grid,
    video_strip,
    write_video,
)


def brightness(frames: np.ndarray) -> list[int]:
    """Each frame's index, read back from its grey level (away from the bright square)."""
    return [round((float(frame[8:, :, :].mean()) - 5) / 15) for frame in frames]


def test_clip_indices_start_center_random_and_short_videos():
    assert clip_indices(12, 4, 2, "start") == [0, 2, 4, 6]
    assert clip_indices(12, 4, 2, "center") == [2, 4, 6, 8]
    assert clip_indices(12, 4, 2, lambda total, span: 5) == [5, 7, 9, 11]
    assert clip_indices(12, 4, 2, 100) == [5, 7, 9, 11]  # clamped so the clip fits
    assert clip_indices(5, 4, 2, "center") == [0, 2, 4, 4]  # too short: the last frame repeats
    with pytest.raises(ValueError, match="num_frames"):
        clip_indices(12, 0, 1)


def test_reading_a_folder_video_gives_the_frames_at_the_stride(video_dir):
    path = video_dir / "clip1.mp4"
    assert count_frames(path) == VIDEO_FRAMES
    clip = read_clip(path, 4, frame_stride=3, start="start")
    assert clip.shape == (4, *VIDEO_SIZE, 3) and clip.dtype == np.uint8
    assert brightness(clip) == [0, 3, 6, 9]
    assert brightness(read_clip(path, 3, 2)) == [3, 5, 7]  # centred: 12 frames, span 5
    assert brightness(read_frames(path.read_bytes(), [7, 1, 7])) == [7, 1, 7]  # bytes, any order, repeats
    assert brightness(read_frames({"path": None, "bytes": path.read_bytes()}, [0, 40])) == [0, 11]  # past the end
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_clip(video_dir / "missing.mp4", 2)
    with pytest.raises(ValueError, match="decode"):
        read_frames(b"not a video", [0])


def test_write_video_mp4_and_gif_round_trip(tmp_path):
    frames = [Image.fromarray(video_frame(i, 0)) for i in range(5)]
    mp4 = write_video(frames, tmp_path / "out" / "clip.mp4", fps=5)
    assert brightness(read_clip(mp4, 5, 1, "start")) == [0, 1, 2, 3, 4]
    gif = write_video([np.asarray(f) / 255.0 for f in frames], tmp_path / "clip.gif", fps=5)
    with Image.open(gif) as image:
        assert image.n_frames == 5
    odd = [Image.new("L", (7, 5), 128)] * 2  # odd sides are padded for H.264
    assert count_frames(write_video(odd, tmp_path / "odd.mp4")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "odd.mp4", "out"]  # no temporary files left
    with pytest.raises(ValueError, match=".mp4, .gif"):
        write_video(frames, tmp_path / "clip.avi")


def test_video_grid_and_strip():
    videos = [[Image.new("RGB", (4, 2), (v * 50, 0, 0)) for _ in range(3)] for v in range(4)]
    grid = video_grid(videos, rows=2, scale=2)
    assert len(grid) == 3 and grid[0].size == (16, 8)
    assert video_strip(videos, rows=2, padding=0).size == (2 * 3 * 4, 2 * 2)


def test_video_folder_with_metadata_loads_with_labels_and_captions(video_dir, cache_dir):
    dataset = load_video_dataset(train_data_dir=str(video_dir), cache_dir=str(cache_dir))
    assert len(dataset) == 4 and {"video", "label", "text"} <= set(dataset.column_names)
    row = dataset[1]
    assert row["video"]["path"].endswith("clip1.mp4") and row["label"] == 1
    assert brightness(read_clip(row["video"], 2, 5, "start")) == [0, 5]
    with pytest.raises(ValueError, match="--video_column"):
        load_video_dataset(train_data_dir=str(video_dir), cache_dir=str(cache_dir), video_column="clip")
    with pytest.raises(ValueError, match="--train_data_dir"):
        load_video_dataset(train_data_dir=str(video_dir / "clip0.mp4"))


def test_hugging_face_dataset_with_a_video_column_reads_without_datasets_video_decoding(video_dir, tmp_path):
    from datasets import Dataset, Video

    paths = [str(video_dir / f"clip{i}.mp4") for i in range(4)]
    hub_like = Dataset.from_dict({"clip": paths, "action": ["run", "jump", "run", "jump"]}).cast_column("clip", Video())
    (tmp_path / "hub").mkdir()
    hub_like.to_parquet(str(tmp_path / "hub" / "train.parquet"))  # a dataset repository with a Video column
    dataset = load_video_dataset(
        dataset_name=str(tmp_path / "hub"), video_column="clip", cache_dir=str(tmp_path / "cache"), max_samples=3
    )
    assert len(dataset) == 3 and isinstance(dataset.features["clip"], Video) and not dataset.features["clip"].decode
    assert brightness(read_clip(dataset[2]["clip"], 2, 6, "start")) == [0, 6]  # {"path", "bytes"} decoded by PyAV
    encoded = encode_label_column(dataset, "action")
    assert encoded.features["action"].names == ["jump", "run"] and encoded[0]["action"] == 1
    clip = VideoClipTransform(num_frames=2, frame_stride=4, height=8, width=8, clip_position="start")(dataset[0]["clip"])
    assert clip.shape == (3, 2, 8, 8)


def test_clip_transform_resizes_crops_flips_and_maps_to_the_pixel_range(video_dir):
    path = video_dir / "clip1.mp4"
    transform = VideoClipTransform(num_frames=3, frame_stride=2, height=6, width=12, clip_position="start")
    clip = transform(str(path))
    assert clip.shape == (3, 3, 6, 12) and clip.dtype == torch.float32  # (C, F, H, W)
    assert -1.0 <= clip.min() and clip.max() <= 1.0
    grey = (clip[:, :, -1].mean(dim=(0, 2)) + 1) / 2 * 255  # bottom row per frame
    assert [round((g.item() - 5) / 15) for g in grey] == [0, 2, 4]
    # 12 x 16 -> cover 6 x 12: scale 0.75 gives 9 x 12, then a centred crop of the rows.
    gray_unit = VideoClipTransform(3, 2, 6, 12, "start", num_channels=1, pixel_range=(0.0, 1.0))(str(path))
    assert gray_unit.shape == (1, 3, 6, 12) and 0.0 <= gray_unit.min() and gray_unit.max() <= 1.0
    flip = VideoClipTransform(3, 2, 6, 12, "start", random_flip=True)
    flipped = [flip(str(path), generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(torch.equal(f, clip.flip(-1)) for f in flipped) and any(torch.equal(f, clip) for f in flipped)
    randomly_placed = VideoClipTransform(2, 1, 12, 16, "random")
    starts = {round(((randomly_placed(str(path), generator=torch.Generator().manual_seed(s))[:, 0, -1].mean() + 1)
                     / 2 * 255 - 5).item() / 15) for s in range(6)}  # fmt: skip
    assert len(starts) > 1
    with pytest.raises(ValueError, match="clip_position"):
        VideoClipTransform(2, 1, 8, 8, "middle")


def test_video_examples_batch_into_clips_and_encode_to_3d_grids(video_dir, cache_dir):
    from conftest import make_vqmodel

    dataset = load_video_dataset(train_data_dir=str(video_dir), cache_dir=str(cache_dir))
    transform = VideoClipTransform(num_frames=2, frame_stride=3, height=8, width=8, random_flip=True)
    examples = VideoExamples(dataset, transform, "video", label_column="label", seed=1)
    example = examples[0]
    assert example["pixel_values"].shape == (3, 2, 8, 8) and example["class_labels"] == 0
    assert torch.equal(examples[0]["pixel_values"], example["pixel_values"])  # seeded per (seed, epoch, index)
    batch = TokenBatchCollator()([examples[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 2, 8, 8)
    inputs = TrainingBatchEncoder(make_vqmodel())(batch, "cpu")
    assert inputs["input_ids"].shape == (3, 2, 4, 4) and inputs["class_labels"].tolist() == [0, 1, 0]


def test_a_file_without_a_video_stream_is_a_value_error_naming_it(tmp_path):
    import av
    import numpy as np

    from nar_diffusers.utils.video_utils import count_frames, read_frames

    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    for read in (count_frames, lambda source: read_frames(source, [0])):
        with pytest.raises(ValueError, match="sound.wav.*no video stream"):
            read(str(path))
