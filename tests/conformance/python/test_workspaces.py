"""Workspaces made with create_workspace, through the real client: owners administer them,
others get in with the tokens owners mint, list_workspaces and get_workspace_info describe
them, and delete_workspace closes their connections, clears their data and voids every
grant issued for them, also when someone takes the name again. And what an attacker tries."""

import asyncio

import pytest
from hypha_rpc import connect_to_server

from conftest import hypha_token, run

pytestmark = pytest.mark.timeout(180)


async def poll(check, timeout, what):
    """Awaits `check()` until it returns something true; the last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def refused(server_url, token, workspace, client_id):
    """The reason a connection to `workspace` is refused (it must be)."""
    with pytest.raises(Exception) as caught:
        api = await connect_to_server({"server_url": server_url, "token": token, "workspace": workspace,
                                       "client_id": client_id})
        await api.disconnect()
    return str(caught.value)


def test_a_made_workspace_from_creation_to_deletion(server):
    async def main():
        alice_token = hypha_token("alice-ws")
        alice = await connect_to_server({"server_url": server.url, "token": alice_token, "client_id": "alice-home"})
        made = await alice.create_workspace({
            "id": "lab-made", "name": "The lab", "description": "microscopes", "persistent": True,
        })
        assert made["id"] == "lab-made" and made["persistent"] is True
        assert made["owners"] == ["alice-ws"]
        info = await alice.get_workspace_info("lab-made")
        assert (info["name"], info["description"], info["owners"]) == ("The lab", "microscopes", ["alice-ws"])
        with pytest.raises(Exception, match="Workspace already exists: lab-made"):
            await alice.create_workspace({"id": "lab-made"})
        # overwrite=True replaces the description, for one who administers it.
        await alice.create_workspace({"id": "lab-made", "name": "The lab", "description": "two microscopes",
                                      "persistent": True}, overwrite=True)
        assert (await alice.get_workspace_info("lab-made"))["description"] == "two microscopes"

        listed = await alice.list_workspaces()
        assert [w["id"] for w in listed] == ["ws-user-alice-ws", "lab-made"]
        assert [w["id"] for w in await alice.list_workspaces({"persistent": True})] == ["lab-made"]
        assert len(await alice.list_workspaces(offset=1, limit=1)) == 1

        # The owner works in it and mints tokens for it.
        inside = await connect_to_server({"server_url": server.url, "token": alice_token, "workspace": "lab-made",
                                          "client_id": "microscope"})
        await inside.register_service({"id": "stage", "config": {"visibility": "protected"}, "move": lambda x: x + 1})
        await inside.set_env("objective", "40x")
        bob_token = await alice.generate_token({"workspace": "lab-made", "permission": "read_write"})
        bob = await connect_to_server({"server_url": server.url, "token": bob_token, "workspace": "lab-made",
                                       "client_id": "bob-viewer"})
        stage = await bob.get_service("microscope:stage")
        assert await stage.move(1) == 2
        assert "lab-made" in [w["id"] for w in await bob.list_workspaces()]
        # Read-write is not admin: neither bob nor dan (granted read_write by a token minted
        # elsewhere since the workspace was made) overwrites or deletes it.
        with pytest.raises(Exception, match="Permission denied for workspace lab-made"):
            await bob.delete_workspace("lab-made")
        dan = await connect_to_server({"server_url": server.url, "token": hypha_token("dan-ws", {"lab-made": "rw"}),
                                       "workspace": "lab-made", "client_id": "dan"})
        with pytest.raises(Exception, match="cannot overwrite workspace lab-made"):
            await dan.create_workspace({"id": "lab-made", "description": "mine"}, overwrite=True)
        with pytest.raises(Exception, match="Permission denied for workspace lab-made"):
            await dan.delete_workspace("lab-made")
        await dan.disconnect()
        # Somebody else neither gets in nor sees it.
        eve_token = hypha_token("eve-ws")
        assert "does not exist or is not accessible" in await refused(server.url, eve_token, "lab-made", "eve-x")
        eve = await connect_to_server({"server_url": server.url, "token": eve_token})
        assert [w["id"] for w in await eve.list_workspaces()] == ["ws-user-eve-ws"]
        with pytest.raises(Exception, match="Permission denied for workspace lab-made"):
            await eve.get_workspace_info("lab-made")

        # Deleting it closes its connections, everywhere in it.
        admin = await connect_to_server({"server_url": server.url, "token": hypha_token("root-ws", roles=["admin"])})
        assert sorted(await admin.list_clients("lab-made")) == ["lab-made/bob-viewer", "lab-made/microscope"]
        await alice.delete_workspace("lab-made")
        await poll(lambda: _empty(admin.list_clients("lab-made")), 10, "the deleted workspace's clients to be closed")
        await poll(lambda: _empty(admin.list_services("lab-made")), 10, "the deleted workspace's services to go")
        assert "lab-made" not in [w["id"] for w in await alice.list_workspaces()]
        with pytest.raises(Exception, match="Workspace lab-made not found"):
            await alice.delete_workspace("lab-made")
        # Its grants are void: bob's token no longer opens it, nor does alice's (no owner now).
        assert "does not exist or is not accessible" in await refused(server.url, bob_token, "lab-made", "bob-again")
        assert "does not exist or is not accessible" in await refused(server.url, alice_token, "lab-made", "alice-again")

        # Carol takes the name at once: it is hers, empty, and bob's old grant stays void.
        carol_token = hypha_token("carol-ws")
        carol = await connect_to_server({"server_url": server.url, "token": carol_token, "client_id": "carol-home"})
        remade = await carol.create_workspace({"id": "lab-made"})
        assert remade["owners"] == ["carol-ws"] and remade["persistent"] is False
        assert "does not exist or is not accessible" in await refused(server.url, bob_token, "lab-made", "bob-third")
        carol_inside = await connect_to_server({"server_url": server.url, "token": carol_token, "workspace": "lab-made"})
        assert await carol_inside.get_env() == {}, "the deleted workspace's data is gone"
        # A restart keeps the workspace and its owner.
        for api in (alice, eve, admin, carol, carol_inside):
            await api.disconnect()
        server.stop()
        server.start()
        carol_inside = await connect_to_server({"server_url": server.url, "token": carol_token, "workspace": "lab-made"})
        assert (await carol_inside.get_workspace_info())["owners"] == ["carol-ws"]
        assert "does not exist or is not accessible" in await refused(server.url, bob_token, "lab-made", "bob-fourth")
        await carol_inside.delete_workspace("lab-made")

    run(main())


async def _empty(pending):
    return len(await pending) == 0


def test_making_workspaces_is_refused_where_it_must_be(server):
    async def main():
        anonymous = await connect_to_server({"server_url": server.url})
        with pytest.raises(Exception, match="Only registered user can create workspace"):
            await anonymous.create_workspace({"id": "anon-lab"})
        await anonymous.disconnect()

        mallory_token = hypha_token("mallory")
        mallory = await connect_to_server({"server_url": server.url, "token": mallory_token, "client_id": "m-home"})
        for config, message in [
            ({"id": "nohyphen"}, "must contain at least one hyphen"),
            ({"id": "Bad-Name"}, "only lowercase letters, numbers and hyphens"),
            ({"id": "lab/../x-y"}, "only lowercase letters, numbers and hyphens"),
            ({"id": "ws-user-alice"}, "another user's own workspace"),
            ({"id": "ws-user-anonymouz-abc"}, "reserved"),
            ({"description": "no id"}, "Workspace id must be provided"),
            ({"id": "lab-x", "owners": "everyone"}, "owners must be a list"),
            ({"id": "lab-x", "colour": "red"}, 'unknown workspace field "colour"'),
            ({"id": "lab-x", "description": "x" * 5000}, "description must be a string of at most 4096"),
        ]:
            with pytest.raises(Exception, match=message):
                await mallory.create_workspace(config)
        with pytest.raises(Exception, match="Limit must be greater than 0"):
            await mallory.list_workspaces(limit=0)
        with pytest.raises(Exception, match="cannot be matched on"):
            await mallory.list_workspaces({"secret": 1})

        # A workspace that tokens name and that is in use is not taken from under its users.
        shared = await connect_to_server({"server_url": server.url, "token": hypha_token("lab-user", {"busy-lab": "rw"}),
                                          "workspace": "busy-lab"})
        with pytest.raises(Exception, match="clients are connected to it"):
            await mallory.create_workspace({"id": "busy-lab"})
        await shared.disconnect()

        # A token derived from an account does not make workspaces (nor own them).
        child_token = await mallory.generate_token({"permission": "read_write"})
        child = await connect_to_server({"server_url": server.url, "token": child_token})
        with pytest.raises(Exception, match="not with a token derived from it"):
            await child.create_workspace({"id": "child-lab"})
        await child.disconnect()

        # Mallory's own workspace, made: still hers. A grant for a made workspace issued
        # before it was made (a token minted elsewhere) does not count.
        await mallory.create_workspace({"id": "mal-lab"})
        stale = hypha_token("victim", {"mal-lab": "rw"}, issued_ago=60)
        assert "does not exist or is not accessible" in await refused(server.url, stale, "mal-lab", "v1")
        # Owners named at creation administer it too, by id or by email.
        await mallory.create_workspace({"id": "team-lab", "owners": ["trent@example.org"]})
        trent = await connect_to_server({"server_url": server.url, "token": hypha_token("trent"), "workspace": "team-lab"})
        assert sorted((await trent.get_workspace_info())["owners"]) == ["mallory", "trent@example.org"]
        await trent.delete_workspace("team-lab")
        await trent.disconnect()

        # The quota: at most 100 live workspaces per account.
        for i in range(99):
            await mallory.create_workspace({"id": f"many-{i}"})
        with pytest.raises(Exception, match="Workspace quota exceeded"):
            await mallory.create_workspace({"id": "many-last"})
        await mallory.delete_workspace("many-0")
        await mallory.create_workspace({"id": "many-last"})
        await mallory.disconnect()

    run(main())


def test_making_and_deleting_in_a_loop_is_bounded(server):
    """Deleted workspaces are remembered (so their tokens stay void): one account cannot make
    and delete without end to grow what every instance keeps."""
    async def main():
        looper = await connect_to_server({"server_url": server.url, "token": hypha_token("looper"), "client_id": "loop"})
        for i in range(1000):
            await looper.create_workspace({"id": f"loop-{i}"})
            await looper.delete_workspace(f"loop-{i}")
        with pytest.raises(Exception, match="has made 1000 workspaces in the last year"):
            await looper.create_workspace({"id": "loop-last"})
        # Taking back a name it made itself is not a new row, and another account is not held.
        await looper.create_workspace({"id": "loop-7"})
        other = await connect_to_server({"server_url": server.url, "token": hypha_token("not-looper")})
        await other.create_workspace({"id": "other-lab"})
        await other.disconnect()
        await looper.disconnect()

    run(main(), timeout=170)
