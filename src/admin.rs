//! The operator's commands: `hypha-rtc user add|list|disable|passwd` and `hypha-rtc token`.

use std::io::BufRead;

use crate::auth::accounts::{
    MIN_PASSWORD_CHARS, NewAccountError, checked_email, create_account, set_password,
};
use crate::config::{Command, Settings, UserAction};
use crate::store::Store;

/// Why an operator's command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request itself cannot be done (its message says why and what to do).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Id(#[from] crate::ids::InvalidId),
    #[error("cannot hash the password: {0}")]
    Hash(argon2::password_hash::Error),
}

impl From<argon2::password_hash::Error> for AdminError {
    fn from(e: argon2::password_hash::Error) -> Self {
        AdminError::Hash(e)
    }
}

impl From<NewAccountError> for AdminError {
    fn from(e: NewAccountError) -> Self {
        match e {
            NewAccountError::Store(e) => AdminError::Store(e),
            other => AdminError::Refused(other.to_string()),
        }
    }
}

impl From<String> for AdminError {
    fn from(message: String) -> Self {
        AdminError::Refused(message)
    }
}

impl From<&str> for AdminError {
    fn from(message: &str) -> Self {
        AdminError::Refused(message.to_string())
    }
}

/// Runs a command; returns what to print, or why it failed.
pub async fn run(
    command: &Command,
    settings: &Settings,
    store: &Store,
    stdin: impl BufRead,
) -> Result<String, AdminError> {
    let now = crate::auth::now_secs();
    match command {
        Command::User { action } => match action {
            UserAction::Add {
                email,
                role,
                password_stdin,
            } => {
                let email = checked_email(email)?;
                let password = read_password(*password_stdin, stdin)?;
                let user = create_account(store, &email, &password, role.clone(), now).await?;
                Ok(format!(
                    "added {email} (id {}, workspace ws-user-{})",
                    user.id, user.id
                ))
            }
            UserAction::List => {
                let mut out = String::from("email\tid\troles\tcreated_at\tdisabled\n");
                for u in store.users().await? {
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}\n",
                        u.email,
                        u.id,
                        u.roles.join(","),
                        u.created_at,
                        if u.disabled_at.is_some() { "yes" } else { "no" }
                    ));
                }
                Ok(out.trim_end().to_string())
            }
            UserAction::Disable { email } => match store.disable_user(email, now).await? {
                true => Ok(format!("disabled {email}")),
                false => Err(AdminError::Refused(format!(
                    "no user with the email {email}"
                ))),
            },
            UserAction::Passwd {
                email,
                password_stdin,
            } => {
                let password = read_password(*password_stdin, stdin)?;
                match set_password(store, email, &password).await? {
                    true => Ok(format!("changed the password of {email}")),
                    false => Err(AdminError::Refused(format!(
                        "no user with the email {email}"
                    ))),
                }
            }
        },
        Command::Token { email, expires_in } => {
            let Some(secret) = &settings.server.jwt_secret else {
                return Err("set --jwt-secret (HYPHA_JWT_SECRET) to the server's secret, or the token will not be accepted".into());
            };
            if *expires_in <= 0 {
                return Err("--expires-in must be a positive number of seconds".into());
            }
            let user = store
                .user_by_email(email)
                .await?
                .ok_or_else(|| format!("no user with the email {email}"))?;
            if user.disabled_at.is_some() {
                return Err(AdminError::Refused(format!("{email} is disabled")));
            }
            let id = crate::ids::UserId::parse(user.id)?;
            let mut info = crate::auth::UserInfo::new(id, user.roles, Some(now + expires_in));
            info.email = Some(user.email);
            Ok(crate::auth::TokenIssuer::new(secret).issue(&info, *expires_in))
        }
        Command::Doctor(_) => Err("the doctor runs on its own, without the store".into()),
    }
}

fn read_password(from_stdin: bool, mut stdin: impl BufRead) -> Result<String, AdminError> {
    if !from_stdin {
        return Err("pass the password on standard input with --password-stdin".into());
    }
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(NewAccountError::ShortPassword.to_string().into());
    }
    Ok(password)
}
