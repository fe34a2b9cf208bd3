//! `wsedge top`: a live view of a running wsedge, read from its admin API every interval.
//!
//! On a terminal it redraws in place on the alternate screen (plain cursor moves and line
//! clears, which any xterm-compatible terminal, tmux or SSH session understands) until `q`,
//! Esc or Ctrl-C. Otherwise, or with `--once`, it prints plain-text frames for scripts.

mod model;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    execute, queue, terminal,
};
use wsedge::Config;

use model::Sample;

/// How long one admin request may take: a wedged wsedge must not freeze the view.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Options {
    pub admin: SocketAddr,
    pub interval: Duration,
    pub once: bool,
}

pub fn run(config: &Config, options: Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let functions: Vec<String> = config.functions.iter().map(|f| f.name.clone()).collect();
    let top = Top {
        config,
        runtime,
        functions,
        options,
    };
    if top.options.once {
        top.once()
    } else if std::io::stdout().is_terminal() {
        top.live()
    } else {
        top.plain()
    }
}

struct Top<'a> {
    config: &'a Config,
    runtime: tokio::runtime::Runtime,
    functions: Vec<String>,
    options: Options,
}

impl Top<'_> {
    fn sample(&self) -> anyhow::Result<Sample> {
        let get = |path| async move {
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                crate::admin_get(self.config, self.options.admin, path),
            )
            .await
            .with_context(|| format!("admin API at {}: GET {path} timed out", self.options.admin))?
        };
        self.runtime.block_on(async {
            let at = Instant::now();
            let connections = serde_json::from_str(&get("/connections").await?)
                .context("parsing /connections")?;
            let instances =
                serde_json::from_str(&get("/instances").await?).context("parsing /instances")?;
            Ok(Sample {
                at,
                connections,
                instances,
            })
        })
    }

    fn title(&self) -> String {
        format!(
            "wsedge top  admin {}  every {:.1}s  {}",
            self.options.admin,
            self.options.interval.as_secs_f64(),
            httpdate::fmt_http_date(std::time::SystemTime::now()),
        )
    }

    /// Two samples an interval apart (a rate needs both), one frame, and out.
    fn once(&self) -> anyhow::Result<()> {
        let first = self.sample()?;
        std::thread::sleep(self.options.interval);
        let second = self.sample()?;
        let frame = model::frame(Some(&first), &second, &self.functions);
        println!("{}", frame.lines(&self.title()).join("\n"));
        Ok(())
    }

    /// Frames separated by a blank line, for a pipe or a log; stops at the first error, as
    /// a script would want.
    fn plain(&self) -> anyhow::Result<()> {
        let mut previous = None;
        loop {
            let now = self.sample()?;
            let frame = model::frame(previous.as_ref(), &now, &self.functions);
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}\n", frame.lines(&self.title()).join("\n"))?;
            out.flush()?;
            previous = Some(now);
            std::thread::sleep(self.options.interval);
        }
    }

    /// The interactive view. An admin API that stops answering (wsedge restarting) shows as
    /// an error line and is asked again next interval, rather than ending the view.
    fn live(&self) -> anyhow::Result<()> {
        let _screen = Screen::enter()?;
        let mut previous: Option<Sample> = None;
        let mut lines = Vec::new();
        let mut next_sample = Instant::now();
        loop {
            if Instant::now() >= next_sample {
                // From when this sample starts: a slow answer delays the next one rather
                // than making them come back to back.
                next_sample = Instant::now() + self.options.interval;
                lines = match self.sample() {
                    Ok(now) => {
                        let frame = model::frame(previous.as_ref(), &now, &self.functions);
                        previous = Some(now);
                        frame.lines(&self.title())
                    }
                    Err(e) => {
                        // Rates across the gap would be averaged over an unknown time.
                        previous = None;
                        vec![self.title(), format!("error: {e:#}")]
                    }
                };
                lines.push(String::new());
                lines.push("q: quit".to_string());
                draw(&lines)?;
            }
            let wait = next_sample.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                match event::read()? {
                    Event::Key(key) if quits(&key) => return Ok(()),
                    Event::Resize(..) => draw(&lines)?,
                    _ => {}
                }
            }
        }
    }
}

/// `q`, Esc, or Ctrl-C (raw mode turns Ctrl-C into a key, not a signal).
fn quits(key: &KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
            || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)))
}

/// Writes `lines` from the top-left corner, each cut to the terminal's width (a wrapped line
/// would push the rest down and scroll), and clears whatever the last frame left below.
fn draw(lines: &[String]) -> anyhow::Result<()> {
    let (width, height) = terminal::size()?;
    let mut out = std::io::stdout().lock();
    for (row, line) in lines.iter().take(usize::from(height)).enumerate() {
        let cut: String = line.chars().take(usize::from(width)).collect();
        queue!(
            out,
            cursor::MoveTo(0, row as u16),
            crossterm::style::Print(cut),
            terminal::Clear(terminal::ClearType::UntilNewLine)
        )?;
    }
    queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
    out.flush()?;
    Ok(())
}

/// Raw mode on the alternate screen with the cursor hidden, for as long as it lives: dropping
/// it (a return, an error or a panic unwinding) gives the user back their terminal as it was.
struct Screen;

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        terminal::enable_raw_mode().context("the terminal refused raw mode")?;
        let screen = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}
