//! People who sign in to the portal and the console, and their sessions. A person is an email with
//! a role (a customer also has an account); the password is set through a one-time link (an
//! invitation, or a reset) and kept as an argon2id hash. A session is a random token whose SHA-256
//! is stored, with its own CSRF token; it ends on sign-out, after `idle` without use, or `absolute`
//! after sign-in. Repeated failed sign-ins lock the email for a while.
//!
//! This is not money: it lives in tables beside the log, as API keys do.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Duration, Utc};
use domain::AccountId;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// Failed sign-ins in a row that lock an email, and for how long.
pub const FAILURES_MAX: i32 = 5;
pub const LOCKOUT: Duration = Duration::minutes(15);
/// How long an invitation and a reset link stay usable.
pub const INVITATION_VALID: Duration = Duration::days(7);
pub const RESET_VALID: Duration = Duration::hours(1);
/// Passwords: long enough to resist guessing, bounded so hashing stays cheap to refuse.
pub const PASSWORD_CHARS_MIN: usize = 12;
pub const PASSWORD_CHARS_MAX: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Customer,
    Finance,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Customer, Role::Finance, Role::Admin];

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Finance => "finance",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "customer" => Some(Role::Customer),
            "finance" => Some(Role::Finance),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Session lifetimes.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// Signed out after this long without a request.
    pub idle: Duration,
    /// Signed out this long after signing in, whatever happens.
    pub absolute: Duration,
}

impl Default for SessionLimits {
    fn default() -> SessionLimits {
        SessionLimits {
            idle: Duration::minutes(30),
            absolute: Duration::hours(12),
        }
    }
}

/// A signed-in person, as a request sees them.
#[derive(Clone, Debug)]
pub struct Session {
    pub person_id: Uuid,
    pub email: String,
    pub role: Role,
    pub account_id: Option<AccountId>,
    /// The token every form of this session carries.
    pub csrf_token: String,
}

/// A new session: the cookie's value (shown once) and the session.
#[derive(Clone, Debug)]
pub struct SignedIn {
    pub cookie: String,
    pub session: Session,
}

#[derive(Debug, thiserror::Error)]
pub enum PeopleError {
    #[error("the email or the password is wrong")]
    WrongCredentials,
    #[error("too many failed sign-ins: try again after {0}")]
    Locked(DateTime<Utc>),
    #[error("this link is unknown, used or expired")]
    BadLink,
    #[error("a password is {PASSWORD_CHARS_MIN} to {PASSWORD_CHARS_MAX} characters")]
    WeakPassword,
    #[error("{0} is not an email address")]
    BadEmail(String),
    #[error("{0} is someone else's email already")]
    EmailTaken(String),
    #[error("a customer belongs to an account; finance and admin people to none")]
    RoleAndAccount,
    #[error("{0} has set a password already: a new one is theirs to ask for, at /reset")]
    AlreadyActive(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

type Result<T> = std::result::Result<T, PeopleError>;

fn sha256(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

/// A random token: 32 bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Hashing and verifying are slow on purpose: they run on the blocking pool, never on the threads
/// that serve requests.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.expect("password hashing does not panic")
}

fn hash_password(password: &str) -> Result<String> {
    let chars = password.chars().count();
    if !(PASSWORD_CHARS_MIN..=PASSWORD_CHARS_MAX).contains(&chars) {
        return Err(PeopleError::WeakPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2id hashes any password")
        .to_string())
}

fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok())
}

/// A hash no password matches, verified against when the email is unknown, so that an unknown
/// email costs the same time as a wrong password.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_password("no password matches this one").expect("a valid password"));

fn normal_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.contains(char::is_whitespace)
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.'));
    if valid {
        Ok(email)
    } else {
        Err(PeopleError::BadEmail(email))
    }
}

/// Invites a person: creates them (without a password) unless the email is known with the same
/// role and account and no password yet, and returns a one-time link token to set the password
/// with.
pub async fn invite(pool: &PgPool, email: &str, role: Role, account_id: Option<AccountId>, now: DateTime<Utc>) -> Result<String> {
    let email = normal_email(email)?;
    if (role == Role::Customer) != account_id.is_some() {
        return Err(PeopleError::RoleAndAccount);
    }
    let mut tx = pool.begin().await?;
    let existing: Option<(Uuid, String, Option<Uuid>, bool)> =
        sqlx::query_as("SELECT person_id, role, account_id, password_hash IS NOT NULL FROM people WHERE email = $1 FOR UPDATE")
            .bind(&email)
            .fetch_optional(&mut *tx)
            .await?;
    let person_id = match existing {
        Some((person_id, existing_role, existing_account, active)) => {
            if existing_role != role.as_str() || existing_account != account_id.map(|id| id.0) {
                return Err(PeopleError::EmailTaken(email));
            }
            // An invitation sets a first password; it never replaces one (that would hand whoever
            // invites a way into someone's login).
            if active {
                return Err(PeopleError::AlreadyActive(email));
            }
            person_id
        }
        None => {
            let person_id = Uuid::now_v7();
            sqlx::query("INSERT INTO people (person_id, email, role, account_id) VALUES ($1, $2, $3, $4)")
                .bind(person_id)
                .bind(&email)
                .bind(role.as_str())
                .bind(account_id.map(|id| id.0))
                .execute(&mut *tx)
                .await?;
            person_id
        }
    };
    let link = random_token();
    sqlx::query("INSERT INTO person_links (token_sha256, person_id, purpose, expires_at) VALUES ($1, $2, 'invitation', $3)")
        .bind(sha256(&link))
        .bind(person_id)
        .bind(now + INVITATION_VALID)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(link)
}

/// A reset link for a known email (None for an unknown one: the caller answers the same either way).
pub async fn request_reset(pool: &PgPool, email: &str, now: DateTime<Utc>) -> Result<Option<String>> {
    let Ok(email) = normal_email(email) else {
        return Ok(None);
    };
    let person: Option<Uuid> = sqlx::query_scalar("SELECT person_id FROM people WHERE email = $1")
        .bind(&email)
        .fetch_optional(pool)
        .await?;
    let Some(person_id) = person else {
        return Ok(None);
    };
    let link = random_token();
    sqlx::query("INSERT INTO person_links (token_sha256, person_id, purpose, expires_at) VALUES ($1, $2, 'reset', $3)")
        .bind(sha256(&link))
        .bind(person_id)
        .bind(now + RESET_VALID)
        .execute(pool)
        .await?;
    Ok(Some(link))
}

/// Whether a link can still be used (for the page that asks for the new password).
pub async fn link_is_usable(pool: &PgPool, link: &str, now: DateTime<Utc>) -> Result<bool> {
    let usable: Option<bool> = sqlx::query_scalar("SELECT used_at IS NULL AND expires_at > $2 FROM person_links WHERE token_sha256 = $1")
        .bind(sha256(link))
        .bind(now)
        .fetch_optional(pool)
        .await?;
    Ok(usable == Some(true))
}

/// Uses a one-time link to set the password: the link is spent, the lockout lifted, and every
/// session of the person ended (a reset after a theft throws the thief out).
pub async fn set_password(pool: &PgPool, link: &str, password: &str, now: DateTime<Utc>) -> Result<()> {
    let password = password.to_string();
    let hash = blocking(move || hash_password(&password)).await?;
    let mut tx = pool.begin().await?;
    let person: Option<Uuid> = sqlx::query_scalar(
        "UPDATE person_links SET used_at = $2 WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > $2 RETURNING person_id",
    )
    .bind(sha256(link))
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let person_id = person.ok_or(PeopleError::BadLink)?;
    sqlx::query("UPDATE people SET password_hash = $2, failed_attempts = 0, locked_until = NULL WHERE person_id = $1")
        .bind(person_id)
        .bind(hash)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE sessions SET ended_at = $2 WHERE person_id = $1 AND ended_at IS NULL")
        .bind(person_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    // Every other link of the person is spent too: an older reset or invitation link (in a
    // mailbox, in a log) cannot set the password again.
    sqlx::query("UPDATE person_links SET used_at = $2 WHERE person_id = $1 AND used_at IS NULL")
        .bind(person_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Signs in: a new session on the right password (the failures forgotten); a wrong one counts,
/// and `FAILURES_MAX` in a row lock the email for `LOCKOUT`.
pub async fn sign_in(pool: &PgPool, email: &str, password: &str, now: DateTime<Utc>) -> Result<SignedIn> {
    let email = normal_email(email).map_err(|_| PeopleError::WrongCredentials)?;
    let row: Option<(Uuid, String, Option<Uuid>, Option<String>, i32, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT person_id, role, account_id, password_hash, failed_attempts, locked_until FROM people WHERE email = $1")
            .bind(&email)
            .fetch_optional(pool)
            .await?;
    let Some((person_id, role, account_id, hash, _, locked_until)) = row else {
        let password = password.to_string();
        blocking(move || password_matches(&password, &DUMMY_HASH)).await;
        return Err(PeopleError::WrongCredentials);
    };
    if let Some(until) = locked_until.filter(|until| *until > now) {
        return Err(PeopleError::Locked(until));
    }
    // The attempt is counted as failed before the password is checked, in one statement that
    // also refuses it once the email is locked: guesses sent at once cannot all pass the check
    // before any is counted. A right password sets the count back to zero below. Counted in the
    // database, so every process sees the same count.
    let counted: Option<i32> = sqlx::query_scalar(
        "UPDATE people SET failed_attempts = failed_attempts + 1, \
           locked_until = CASE WHEN failed_attempts + 1 >= $2 THEN $3 ELSE NULL END \
         WHERE person_id = $1 AND (locked_until IS NULL OR locked_until <= $4) \
         RETURNING failed_attempts",
    )
    .bind(person_id)
    .bind(FAILURES_MAX)
    .bind(now + LOCKOUT)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    if counted.is_none() {
        let until: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT locked_until FROM people WHERE person_id = $1")
            .bind(person_id)
            .fetch_one(pool)
            .await?;
        return Err(PeopleError::Locked(until.unwrap_or(now + LOCKOUT)));
    }
    let matches = {
        let (password, hash) = (password.to_string(), hash.unwrap_or_else(|| DUMMY_HASH.clone()));
        blocking(move || password_matches(&password, &hash)).await
    };
    if !matches {
        return Err(PeopleError::WrongCredentials);
    }
    sqlx::query("UPDATE people SET failed_attempts = 0, locked_until = NULL WHERE person_id = $1")
        .bind(person_id)
        .execute(pool)
        .await?;
    let cookie = random_token();
    let csrf_token = random_token();
    sqlx::query("INSERT INTO sessions (session_sha256, person_id, csrf_token, created_at, last_seen_at) VALUES ($1, $2, $3, $4, $4)")
        .bind(sha256(&cookie))
        .bind(person_id)
        .bind(&csrf_token)
        .bind(now)
        .execute(pool)
        .await?;
    Ok(SignedIn {
        cookie,
        session: Session {
            person_id,
            email,
            role: Role::parse(&role).expect("the table holds known roles"),
            account_id: account_id.map(AccountId),
            csrf_token,
        },
    })
}

/// A session `s` named by its cookie's hash ($1) that is open at $2: not ended, used within the idle
/// limit ($3), begun within the absolute one ($4).
const OPEN_SESSION: &str = "s.session_sha256 = $1 AND s.ended_at IS NULL AND s.last_seen_at > $2 - $3 AND s.created_at > $2 - $4";

/// The session a cookie names, if it is still open at `now` (and then marked as used now).
pub async fn session(pool: &PgPool, cookie: &str, limits: SessionLimits, now: DateTime<Utc>) -> Result<Option<Session>> {
    let row: Option<(Uuid, String, String, Option<Uuid>, String)> = sqlx::query_as(&format!(
        "UPDATE sessions s SET last_seen_at = $2 FROM people p \
             WHERE {OPEN_SESSION} AND s.person_id = p.person_id \
             RETURNING p.person_id, p.email, p.role, p.account_id, s.csrf_token"
    ))
    .bind(sha256(cookie))
    .bind(now)
    .bind(limits.idle)
    .bind(limits.absolute)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(person_id, email, role, account_id, csrf_token)| Session {
        person_id,
        email,
        role: Role::parse(&role).expect("the table holds known roles"),
        account_id: account_id.map(AccountId),
        csrf_token,
    }))
}

/// Whether the session a cookie names is still open at `now`, without marking it used: a page
/// left open (its live stream) does not keep its session alive.
pub async fn session_is_open(pool: &PgPool, cookie: &str, limits: SessionLimits, now: DateTime<Utc>) -> Result<bool> {
    let open: Option<bool> = sqlx::query_scalar(&format!("SELECT TRUE FROM sessions s WHERE {OPEN_SESSION}"))
        .bind(sha256(cookie))
        .bind(now)
        .bind(limits.idle)
        .bind(limits.absolute)
        .fetch_optional(pool)
        .await?;
    Ok(open.is_some())
}

/// Ends the session a cookie names.
pub async fn sign_out(pool: &PgPool, cookie: &str, now: DateTime<Utc>) -> Result<()> {
    sqlx::query("UPDATE sessions SET ended_at = $2 WHERE session_sha256 = $1 AND ended_at IS NULL")
        .bind(sha256(cookie))
        .bind(now)
        .execute(pool)
        .await?;
    Ok(())
}
