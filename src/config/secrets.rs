//! Secrets: read from the file, a file beside it, a systemd credential or the environment,
//! and never printed.

use super::*;

/// The keys and the variable one secret can come from.
pub(super) struct SecretSource {
    pub(super) inline: &'static str,
    pub(super) file: &'static str,
    pub(super) env: &'static str,
}

pub(super) const API_KEY: SecretSource = SecretSource {
    inline: "api_key",
    file: "api_key_file",
    env: ENV_BRAZE_API_KEY,
};

pub(super) const TOKEN: SecretSource = SecretSource {
    inline: "token",
    file: "token_file",
    env: ENV_INGEST_TOKEN,
};

/// Reads a secret from its environment variable, else from the inline key or the file key
/// (not both). `Ok(None)` when none of them is set; the caller decides whether that is fine.
///
/// When the environment variable is set the file named by the config is not read at all: it
/// may not exist where the override is used.
pub(super) fn read_secret(
    s: &Section<'_>,
    ctx: &Ctx<'_>,
    p: &mut Problems,
    source: &SecretSource,
) -> Checked<Option<Secret>> {
    // Type-checked even when the environment wins: a wrong type is still a broken file.
    let inline = s.string(p, source.inline);
    let file = s.string(p, source.file);
    let inline_key = s.key(source.inline);
    let file_key = s.key(source.file);

    if let Some(value) = (ctx.env)(source.env) {
        return secret_value(&value).map(Some).map_err(|why| {
            p.report(
                &format!("{inline_key} (from {})", source.env),
                format!("the value {why}"),
            )
        });
    }
    let (inline, file) = (inline?, file?);
    match (inline, file) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(p.report(
            &inline_key,
            format!("set either {inline_key} or {file_key}, not both"),
        )),
        (Some(value), None) => secret_value(value)
            .map(Some)
            .map_err(|why| p.report(&inline_key, format!("the value {why}"))),
        (None, Some(path)) => read_secret_file(ctx, path)
            .map(Some)
            .map_err(|why| p.report(&file_key, why)),
    }
}

/// The files holding a secret that group or others may read, each with its mode: the config
/// itself when it holds `api_key` or `token` inline, and the key and token files (resolved as
/// `read_secret_file` does; systemd's credential copies are the service's alone).
pub(super) fn exposed_secret_files(
    text: &str,
    config_path: &Path,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(root) = text.parse::<Table>() else {
        return Vec::new();
    };
    let field = |section: &str, key: &str| {
        root.get(section)
            .and_then(|s| s.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut files = Vec::new();
    if field("braze", "api_key").is_some() || field("ingest", "token").is_some() {
        files.push(config_path.to_path_buf());
    }
    for (section, key) in [("braze", "api_key_file"), ("ingest", "token_file")] {
        let Some(path) = field(section, key) else {
            continue;
        };
        let path = Path::new(&path);
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else if let Some(dir) = env(ENV_CREDENTIALS_DIRECTORY) {
            PathBuf::from(dir).join(path)
        } else {
            base_dir.join(path)
        };
        files.push(full);
    }
    files
        .into_iter()
        .filter_map(|f| {
            let mode = std::fs::metadata(&f).ok()?.permissions().mode() & 0o777;
            (mode & 0o077 != 0).then(|| format!("{} (mode {mode:o})", f.display()))
        })
        .collect()
}

/// Reads a secret file; the error names the file and never its contents.
pub(super) fn read_secret_file(ctx: &Ctx<'_>, path: &str) -> Result<Secret, String> {
    if path.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    let path = Path::new(path);
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else if let Some(dir) = (ctx.env)(ENV_CREDENTIALS_DIRECTORY) {
        PathBuf::from(dir).join(path)
    } else {
        ctx.base_dir.join(path)
    };
    let shown = full.display();
    let bytes = std::fs::read(&full).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text"))?;
    secret_value(&text).map_err(|why| format!("{shown} {why}"))
}

/// Trims a secret and checks it can travel in an HTTP header. The error describes the value
/// without quoting it, and reads after "the value" or a file name.
pub(super) fn secret_value(raw: &str) -> Result<Secret, &'static str> {
    // Trimming both ends is safe: HTTP strips a header value's surrounding whitespace anyway,
    // so a token with leading or trailing spaces could never match.
    let value = raw.trim();
    if value.is_empty() {
        return Err("is empty");
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("contains spaces, control characters or non-ASCII characters");
    }
    Ok(Secret::new(value))
}
