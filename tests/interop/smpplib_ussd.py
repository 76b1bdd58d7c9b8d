"""A USSD session against Qepik with python-smpplib, an SMPP client written by others.

Binds as the demo operator's gateway (server mode), dials *150# for a demo wallet, picks the
balance, enters the PIN, and checks the final screen: ussd_service_op 17 (PSSR response), UCS-2
text starting with "Balans". Usage: smpplib_ussd.py HOST PORT SYSTEM_ID PASSWORD MSISDN PIN
"""

import sys

import smpplib.client
import smpplib.command
import smpplib.consts

# smpplib 2.x knows ussd_service_op on submit_sm but not on deliver_sm, and fails to parse a
# deliver_sm that carries it; a gateway using it for USSD needs the parameter declared.
if "ussd_service_op" not in smpplib.command.DeliverSM.params:
    smpplib.command.DeliverSM.params["ussd_service_op"] = smpplib.command.Param(type=int, size=1)
    smpplib.command.DeliverSM.params_order = smpplib.command.DeliverSM.params_order + ("ussd_service_op",)


def main():
    host, port, system_id, password, msisdn, pin = sys.argv[1:7]
    screens = []

    client = smpplib.client.Client(host, int(port), allow_unknown_opt_params=True)
    sms = []

    def received(pdu):
        # USSD screens carry ussd_service_op; SMS (notifications) come on the same bind.
        target = screens if pdu.ussd_service_op is not None else sms
        target.append(pdu)

    client.set_message_received_handler(received)
    client.connect()
    client.bind_transceiver(system_id=system_id, password=password)

    def step(text, op, sequence):
        client.send_message(
            service_type="USSD",
            source_addr_ton=smpplib.consts.SMPP_TON_INTL,
            source_addr=msisdn,
            dest_addr_ton=smpplib.consts.SMPP_TON_UNK,
            destination_addr="*150",
            short_message=text.encode("ascii"),
            data_coding=0,
            ussd_service_op=op,
            its_session_info=(7 << 8) | sequence,
        )
        before = len(screens)
        while len(screens) == before:
            client.read_once()
        pdu = screens[-1]
        raw = pdu.short_message or b""
        text = raw.decode("utf-16-be") if pdu.data_coding == 8 else raw.decode("ascii", "replace")
        op = pdu.ussd_service_op
        print(f"> {text!r} (ussd_service_op {op})")
        return text, op

    text, op = step("*150#", 1, 0)
    assert op == 2 and "1 Balans" in text, (text, op)
    text, op = step("1", 18, 2)
    assert op == 2 and "PIN" in text, (text, op)
    text, op = step(pin, 18, 4)
    assert op == 17 and text.startswith("Balans"), (text, op)
    client.unbind()
    client.disconnect()
    print(f"smpplib: USSD session completed ({len(sms)} SMS received meanwhile)")


if __name__ == "__main__":
    main()
