//! The operator's commands: `hypha-rtc user add|list|disable|passwd` and `hypha-rtc token`.

use std::io::BufRead;

use crate::auth::accounts::hash_password;
use crate::config::{Command, Settings, UserAction};
use crate::store::{Store, UserRecord};

/// Runs a command; returns what to print, or an error message.
pub async fn run(
    command: &Command,
    settings: &Settings,
    store: &Store,
    stdin: impl BufRead,
) -> Result<String, String> {
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
                if store
                    .user_by_email(&email)
                    .await
                    .map_err(|e| e.to_string())?
                    .is_some()
                {
                    return Err(format!("a user with the email {email} already exists"));
                }
                let user = UserRecord {
                    id: format!("u{}", crate::ids::random_id(15)),
                    email: email.clone(),
                    password_hash: hash_password(&password)?,
                    roles: role.clone(),
                    created_at: now,
                    disabled_at: None,
                };
                store.create_user(&user).await.map_err(|e| e.to_string())?;
                Ok(format!(
                    "added {email} (id {}, workspace ws-user-{})",
                    user.id, user.id
                ))
            }
            UserAction::List => {
                let mut out = String::from("email\tid\troles\tcreated_at\tdisabled\n");
                for u in store.users().await.map_err(|e| e.to_string())? {
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
            UserAction::Disable { email } => match store
                .disable_user(email, now)
                .await
                .map_err(|e| e.to_string())?
            {
                true => Ok(format!("disabled {email}")),
                false => Err(format!("no user with the email {email}")),
            },
            UserAction::Passwd {
                email,
                password_stdin,
            } => {
                let password = read_password(*password_stdin, stdin)?;
                match store
                    .set_password(email, &hash_password(&password)?)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    true => Ok(format!("changed the password of {email}")),
                    false => Err(format!("no user with the email {email}")),
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
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no user with the email {email}"))?;
            if user.disabled_at.is_some() {
                return Err(format!("{email} is disabled"));
            }
            let id = crate::ids::UserId::parse(user.id).map_err(|e| e.to_string())?;
            let mut info = crate::auth::UserInfo::new(id, user.roles, Some(now + expires_in));
            info.email = Some(user.email);
            Ok(crate::auth::TokenIssuer::new(secret).issue(&info, *expires_in))
        }
    }
}

fn checked_email(email: &str) -> Result<String, String> {
    let email = email.trim().to_string();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(format!("{email:?} is not an email address"))
    }
}

fn read_password(from_stdin: bool, mut stdin: impl BufRead) -> Result<String, String> {
    if !from_stdin {
        return Err("pass the password on standard input with --password-stdin".into());
    }
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.chars().count() < 8 {
        return Err("the password must have at least 8 characters".into());
    }
    Ok(password)
}
