def test_echo(cluster, client):
    assert client.execute(b"hello") == b"hello"
