//! Per-file progress: an indicatif bar on stderr (when asked for) plus the byte counts used to
//! check that a finished transfer has the size the Hub announced.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What one transfer of one file saw.
pub(crate) struct FileProgress {
    label: String,
    show: bool,
    bar: Option<ProgressBar>,
    /// Size announced by the Hub (`Content-Range: bytes 0-0/<size>`), once known.
    pub expected: Option<u64>,
    /// Bytes in the partial file so far (resumed bytes included).
    pub received: u64,
    finished: bool,
}

impl FileProgress {
    pub fn new(label: String, show: bool) -> Self {
        FileProgress {
            label,
            show,
            bar: None,
            expected: None,
            received: 0,
            finished: false,
        }
    }
}

impl Drop for FileProgress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !self.finished {
                bar.abandon();
            }
        }
    }
}

/// hf-hub takes its progress sink by value: lend it ours.
pub(crate) struct Tracker<'a>(pub &'a mut FileProgress);

impl hf_hub::api::Progress for Tracker<'_> {
    // hf-hub calls `init` before each transfer attempt, then `update(already_on_disk)` when it resumes.
    fn init(&mut self, size: usize, _filename: &str) {
        let p = &mut *self.0;
        p.expected = Some(size as u64);
        p.received = 0;
        if p.show {
            let bar = p.bar.get_or_insert_with(|| {
                let bar = ProgressBar::with_draw_target(Some(size as u64), ProgressDrawTarget::stderr());
                if let Ok(style) =
                    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(p.label.clone());
                bar
            });
            bar.set_length(size as u64);
            bar.set_position(0);
        }
    }

    fn update(&mut self, size: usize) {
        self.0.received += size as u64;
        if let Some(bar) = &self.0.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        self.0.finished = true;
        if let Some(bar) = &self.0.bar {
            bar.finish();
        }
    }
}
