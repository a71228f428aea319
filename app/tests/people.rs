//! People who sign in: the lockout holds under concurrent guesses.

use app::people::{PeopleError, Role};
use ledger::testing::TestDatabase;

#[tokio::test]
async fn concurrent_wrong_passwords_get_no_more_guesses_than_the_lockout_allows() {
    let db = TestDatabase::new().await;
    let now = chrono::Utc::now();
    let link = app::people::invite(&db.pool, "target@example.com", Role::Finance, None, now)
        .await
        .unwrap();
    app::people::set_password(&db.pool, &link, "the right password", now).await.unwrap();
    // Forty guesses at once: each one the database lets through is a password actually tried.
    let guesses: Vec<_> = (0..40)
        .map(|index| {
            let pool = db.pool.clone();
            tokio::spawn(async move { app::people::sign_in(&pool, "target@example.com", &format!("guess number {index}"), now).await })
        })
        .collect();
    let mut tried = 0;
    let mut locked = 0;
    for guess in guesses {
        match guess.await.unwrap() {
            Err(PeopleError::WrongCredentials) => tried += 1,
            Err(PeopleError::Locked(_)) => locked += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tried + locked, 40);
    assert!(tried <= 5, "{tried} passwords were tried before the lockout held");
    // Locked now, the right password included.
    assert!(matches!(
        app::people::sign_in(&db.pool, "target@example.com", "the right password", now).await,
        Err(PeopleError::Locked(_))
    ));
}
